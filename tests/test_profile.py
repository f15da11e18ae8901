"""Norm / update-rate profile: pure functions against numpy, the model-level profile against a
computation from ``output_hidden_states`` done here, on every tiny family."""

import json

import numpy as np
import pytest
import torch
from conftest import processor_or_skip
from helpers import capture_llm_inputs, embedding_norm_reference, vision_mask

import hf_normalign
from hf_normalign.diagnostics.metrics.profile import (
    ModalityProfile,
    ProfileAccumulator,
    adjacent_cosine,
    modality_profile,
    norm_stats,
    profile_from_features,
    projector_gain_stats,
)
from hf_normalign.diagnostics.probes import EncodedSample, default_probe, encode_probe
from hf_normalign.registry import get_spec
from hf_normalign.testing import tiny_batch, tiny_model

# Families whose tiny processor builds here; mistral3 / smolvlm run from tiny_batch encodings.
PROCESSOR_FAMILIES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "gemma3",
    "idefics3",
    "paligemma",
)
BATCH_FAMILIES = ("mistral3", "smolvlm")


def _np_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([float(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v)) for u, v in zip(a, b, strict=True)])


def test_norm_stats_matches_numpy():
    x = np.random.default_rng(0).normal(size=(37, 5)) * 3
    norms = np.linalg.norm(x, axis=1)
    got = norm_stats(torch.from_numpy(x).float())
    n32 = np.linalg.norm(x.astype(np.float32).astype(np.float64), axis=1)
    assert got["mean"] == pytest.approx(n32.mean(), rel=1e-12)
    assert got["std"] == pytest.approx(n32.std(ddof=1), rel=1e-12)
    assert got["median"] == pytest.approx(np.median(n32), rel=1e-12)
    assert (got["min"], got["max"], got["count"]) == pytest.approx((n32.min(), n32.max(), 37))
    assert got["mean"] == pytest.approx(norms.mean(), rel=1e-6)
    even = norm_stats(np.array([[1.0], [2.0], [4.0], [10.0]]))
    assert even["median"] == 3.0  # the average of the two middle values


def test_adjacent_cosine_matches_loop_and_zero_tokens():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 6)), rng.normal(size=(20, 6))
    assert adjacent_cosine(a, b) == pytest.approx(_np_cos(a, b).mean(), abs=1e-14)
    a[3] = 0.0  # a zero token counts as cosine 0, not NaN
    expected = np.concatenate([_np_cos(a[:3], b[:3]), [0.0], _np_cos(a[4:], b[4:])]).mean()
    assert adjacent_cosine(a, b) == pytest.approx(expected, abs=1e-14)
    with pytest.raises(ValueError, match="same tokens"):
        adjacent_cosine(a, b[:5])


def test_streaming_equals_one_shot_and_consecutive_pairs_only():
    g = torch.Generator().manual_seed(0)
    vis = [torch.randn(30, 4, generator=g) * (i + 1) for i in range(4)]
    txt = [torch.randn(12, 4, generator=g) for _ in range(4)]
    one = profile_from_features(vis, txt, layers=[0, 1, 2, 5])
    assert one.update_layers == [1, 2]  # 2 -> 5 is not an adjacent pair
    acc = ProfileAccumulator([0, 1, 2, 5])
    for lo, hi, tlo, thi in ((0, 10, 0, 5), (10, 30, 5, 12)):
        acc.update({k: v[lo:hi] for k, v in zip([0, 1, 2, 5], vis, strict=True)},
                   {k: t[tlo:thi] for k, t in zip([0, 1, 2, 5], txt, strict=True)})  # fmt: skip
    two = acc.result()
    for key in ("vision_norm_mean", "vision_norm_std", "vision_norm_median", "text_norm_mean", "norm_ratio",
                "vision_update_cos", "text_update_cos"):  # fmt: skip
        np.testing.assert_allclose(getattr(two, key), getattr(one, key), rtol=1e-12)
    expect_ratio = [np.linalg.norm(v.numpy(), axis=1).mean() / np.linalg.norm(t.numpy(), axis=1).mean()
                    for v, t in zip(vis, txt, strict=True)]  # fmt: skip
    np.testing.assert_allclose(one.norm_ratio, expect_ratio, rtol=1e-6)


def test_to_dict_is_strict_json_and_round_trips():
    prof = profile_from_features([torch.ones(1, 2)], [torch.ones(3, 2)], num_samples=1)
    assert np.isnan(prof.vision_norm_std[0])  # one token: no sample std
    data = json.loads(json.dumps(prof.to_dict(), allow_nan=False))
    back = ModalityProfile.from_dict(data)
    assert back.layers == prof.layers and np.isnan(back.vision_norm_std[0])
    assert back.text_norm_mean == prof.text_norm_mean


def _encoded(family: str, n: int) -> tuple[torch.nn.Module, object, list[EncodedSample]]:
    model = tiny_model(family)
    if family in BATCH_FAMILIES:  # no processor here: one-sample encodings from tiny_batch
        samples = []
        for seed in range(n):
            batch = tiny_batch(model, batch_size=1, seq_text=6 + seed, with_labels=False, seed=seed)
            ids = batch["input_ids"][0]
            text = torch.zeros_like(ids, dtype=torch.bool)
            text[(~vision_mask(model, ids[None])[0]).nonzero().max() - 2 :] = True  # trailing text tokens
            samples.append(EncodedSample(batch, text, f"s{seed}"))
        return model, None, samples
    processor = processor_or_skip(family)
    return model, processor, encode_probe(processor, default_probe(n))


def _reference(model, samples, final_norm: bool):
    """Per-layer vision / text features from a plain forward with output_hidden_states, one sample at a time."""
    k = len(get_spec(model).decoder_layers(model))
    vis, txt = [[] for _ in range(k + 1)], [[] for _ in range(k + 1)]
    pre_norm = {}
    handle = (
        get_spec(model)
        .decoder_layers(model)[-1]
        .register_forward_hook(lambda m, a, out: pre_norm.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    )
    try:
        for s in samples:
            with torch.no_grad():
                out = model(**s.inputs, output_hidden_states=True)
            states = list(out.hidden_states)
            if not final_norm:
                states[k] = pre_norm["h"]
            vmask = vision_mask(model, s.inputs["input_ids"])[0]
            for layer in range(k + 1):
                vis[layer].append(states[layer][0][vmask].double().numpy())
                txt[layer].append(states[layer][0][s.text_mask].double().numpy())
    finally:
        handle.remove()
    return [np.concatenate(v) for v in vis], [np.concatenate(t) for t in txt]


@pytest.mark.parametrize("family", PROCESSOR_FAMILIES + BATCH_FAMILIES)
def test_profile_equals_output_hidden_states(family):
    model, processor, samples = _encoded(family, 3)
    prof = modality_profile(model, processor, samples, batch_size=2, final_norm=True, progress=False)
    vis, txt = _reference(model, samples, final_norm=True)
    k = len(vis) - 1
    assert prof.layers == list(range(k + 1)) and prof.update_layers == list(range(1, k + 1))
    assert prof.num_samples == 3
    assert prof.num_vision_tokens == len(vis[0]) and prof.num_text_tokens == len(txt[0])
    for kind, feats in (("vision", vis), ("text", txt)):
        norms = [np.linalg.norm(f, axis=1) for f in feats]
        np.testing.assert_allclose(getattr(prof, f"{kind}_norm_mean"), [n.mean() for n in norms], rtol=1e-5)
        np.testing.assert_allclose(
            getattr(prof, f"{kind}_norm_std"), [n.std(ddof=1) for n in norms], rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(getattr(prof, f"{kind}_norm_median"), [np.median(n) for n in norms], rtol=1e-5)
        cos = [_np_cos(feats[i], feats[i + 1]).mean() for i in range(k)]
        np.testing.assert_allclose(getattr(prof, f"{kind}_update_cos"), cos, rtol=1e-5, atol=1e-6)
    ratio = [np.linalg.norm(v, axis=1).mean() / np.linalg.norm(t, axis=1).mean() for v, t in zip(vis, txt, strict=True)]
    np.testing.assert_allclose(prof.norm_ratio, ratio, rtol=1e-5)


def test_default_reports_last_layer_before_final_norm():
    model, processor, samples = _encoded("llava", 2)
    prof = modality_profile(model, processor, samples, progress=False)
    assert prof.settings["final_norm"] is False
    vis, _ = _reference(model, samples, final_norm=False)
    np.testing.assert_allclose(prof.vision_norm_mean, [np.linalg.norm(v, axis=1).mean() for v in vis], rtol=1e-5)


def test_errors():
    model, processor, samples = _encoded("llava", 2)
    with pytest.raises(ValueError, match="out of range"):
        modality_profile(model, processor, samples, layers=[7], progress=False)
    no_text = [EncodedSample(s.inputs, torch.zeros_like(s.text_mask), s.name) for s in samples]
    with pytest.raises(ValueError, match="no text-passage tokens"):
        modality_profile(model, processor, no_text, progress=False)
    with pytest.raises(ValueError, match="2-D"):
        norm_stats(torch.ones(3))
    with pytest.raises(ValueError, match="same tokens at every layer"):
        ProfileAccumulator([0, 1]).update(
            {0: torch.ones(2, 3), 1: torch.ones(3, 3)}, {0: torch.ones(1, 3), 1: torch.ones(1, 3)}
        )
    with pytest.raises(ValueError, match="missing layers"):
        ProfileAccumulator([0, 1]).update({0: torch.ones(2, 3)}, {0: torch.ones(1, 3), 1: torch.ones(1, 3)})


def _vision_path_by_hand(model, samples):
    """Per-row float64 norms along the vision path, one sample at a time: the projector's input with a plain
    pre-hook, its output before the LayerNorm by calling ``projector.forward`` on that input (no hooks run),
    and the LLM input rows at vision / passage positions with a plain pre-hook on the language model."""
    projector = get_spec(model).get(model, get_spec(model).projector)
    seen = {}
    handle = projector.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    norms = {"vision_encoder_output": [], "projector_output": [], "llm_input_vision": [], "text_embedding": []}
    try:
        for s in samples:
            embeds = capture_llm_inputs(model, s.inputs)[0].double()
            with torch.no_grad():
                raw = projector.forward(seen["x"])
            norms["vision_encoder_output"].append(seen["x"].double().flatten(0, -2).norm(dim=1))
            norms["projector_output"].append(raw.double().flatten(0, -2).norm(dim=1))
            norms["llm_input_vision"].append(embeds[vision_mask(model, s.inputs["input_ids"])[0]].norm(dim=1))
            norms["text_embedding"].append(embeds[s.text_mask].norm(dim=1))
    finally:
        handle.remove()
    return {stage: torch.cat(n) for stage, n in norms.items()}


@pytest.mark.parametrize("patched", [True, False])
def test_vision_path_norms_and_gain_stats_by_hand(patched):
    model, processor, samples = _encoded("llava", 3)
    if patched:
        model = hf_normalign.patch(model, methods=["projector_norm"])
        with torch.no_grad():  # a "trained" gain, away from its init
            g = model.normalign.projector_norm[0].weight
            g.mul_(torch.linspace(0.5, 3.0, g.numel()))
            g[::7] *= -1
    prof = modality_profile(model, processor, samples, layers=[2], batch_size=2, progress=False)
    want = _vision_path_by_hand(model, samples)
    assert list(prof.vision_path_norms) == list(want)
    for stage, norms in want.items():
        got = prof.vision_path_norms[stage]
        assert got["count"] == norms.numel(), stage
        assert got["mean"] == pytest.approx(float(norms.mean()), rel=1e-6), stage
        assert got["std"] == pytest.approx(float(norms.std()), rel=1e-5), stage
    # Before the LayerNorm the projector writes its own norm; the LayerNorm brings it to the text scale.
    moved = prof.vision_path_norms["projector_output"]["mean"] != prof.vision_path_norms["llm_input_vision"]["mean"]
    assert moved == patched
    assert json.loads(json.dumps(prof.to_dict(), allow_nan=False)) == prof.to_dict()
    assert ModalityProfile.from_dict(prof.to_dict()).vision_path_norms == prof.vision_path_norms
    if not patched:
        assert prof.projector_gain is None and projector_gain_stats(model) is None
        return
    g = model.normalign.projector_norm[0].weight.detach().double()
    target = embedding_norm_reference(model)  # T from the embedding table, float64, here
    init = target / g.numel() ** 0.5
    stats = prof.projector_gain
    assert stats == projector_gain_stats(model)
    assert stats["mean_abs"] == pytest.approx(float(g.abs().mean()), rel=1e-12)
    assert stats["l2"] == pytest.approx(float(torch.sqrt((g * g).sum())), rel=1e-12)
    assert stats["init_value"] == pytest.approx(init, rel=1e-9)
    assert stats["mean_abs_to_init"] == pytest.approx(float(g.abs().mean()) / init, rel=1e-9)
    assert stats["l2_to_init"] == pytest.approx(float(g.norm()) / target, rel=1e-9)
    assert stats["gwc_scale"] == pytest.approx(1 / float(g.abs().mean()), rel=1e-12)
    assert abs(stats["mean_abs_to_init"] - 1) > 0.5  # the planted change is visible
