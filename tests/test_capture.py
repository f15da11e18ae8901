"""Capture engine: rows equal a plain `output_hidden_states` forward, whatever the batching and padding."""

from __future__ import annotations

import pytest
import torch
from conftest import REQUIRED_FAMILIES, processor_or_skip
from helpers import vision_mask
from PIL import Image

from hf_normalign.diagnostics.engine import capture
from hf_normalign.diagnostics.probes import EncodedSample, Probe, default_probe, encode_probe
from hf_normalign.model_view import ModelView
from hf_normalign.registry import get_spec
from hf_normalign.testing import tiny_batch, tiny_model, tiny_processor

PROCESSOR_FAMILIES = (*REQUIRED_FAMILIES, "gemma3", "idefics3", "paligemma")
TOL = {"rtol": 1e-4, "atol": 1e-5}  # batched vs single-sample fp32 matmuls


def reference_forward(model, sample: EncodedSample) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, dict]:
    """hidden_states, the last decoder layer's raw output and k_proj outputs of one unpadded sample."""
    layers = get_spec(model).decoder_layers(model)
    seen: dict = {"keys": {}}
    handles = [layers[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("pre_norm", out))]
    for i, layer in enumerate(layers):
        handles.append(
            layer.self_attn.k_proj.register_forward_hook(lambda m, a, out, k=i + 1: seen["keys"].__setitem__(k, out))
        )
    try:
        with torch.no_grad():
            out = model(**sample.inputs, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    pre_norm = seen["pre_norm"][0] if isinstance(seen["pre_norm"], tuple) else seen["pre_norm"]
    return out.hidden_states, pre_norm, seen["keys"]


@pytest.mark.parametrize("family", PROCESSOR_FAMILIES)
def test_rows_equal_plain_forward(family):
    model, proc = tiny_model(family), processor_or_skip(family)
    samples = encode_probe(proc, default_probe(3))
    k = len(get_spec(model).decoder_layers(model))
    batches = list(
        capture(model, proc, samples, include_embeddings=True, batch_size=2, capture_keys=True, progress=False)
    )
    pre = next(capture(model, proc, samples, layers=[-1], final_norm=False, batch_size=3, progress=False))
    assert batches[0].layers == list(range(k + 1))
    for i, sample in enumerate(samples):
        hidden, pre_norm, keys = reference_forward(model, sample)
        vis = vision_mask(model, sample.input_ids)
        batch = batches[i // 2]
        v_rows, t_rows = batch.vision_sample == i, batch.text_sample == i
        for layer in range(k + 1):
            torch.testing.assert_close(batch.vision[layer][v_rows], hidden[layer][0][vis], **TOL)
            torch.testing.assert_close(batch.text[layer][t_rows], hidden[layer][0][sample.text_mask], **TOL)
            if layer:
                torch.testing.assert_close(batch.vision_keys[layer][v_rows], keys[layer][0][vis], **TOL)
                torch.testing.assert_close(batch.text_keys[layer][t_rows], keys[layer][0][sample.text_mask], **TOL)
        # final_norm=False: the last layer before the final norm.
        torch.testing.assert_close(pre.vision[k][pre.vision_sample == i], pre_norm[0][vis], **TOL)
        torch.testing.assert_close(pre.text[k][pre.text_sample == i], pre_norm[0][sample.text_mask], **TOL)


@pytest.mark.parametrize("family", PROCESSOR_FAMILIES)
def test_text_positions_are_exactly_the_passage(family):
    proc = processor_or_skip(family)
    probe = default_probe(2)
    for sample, encoded in zip(probe, encode_probe(proc, probe), strict=True):
        ids, mask = encoded.input_ids, encoded.text_mask
        assert proc.tokenizer.decode(ids[mask]).strip() == sample.text
        first = int(mask.nonzero()[0])
        assert mask[first:].sum() == mask.sum() and mask[first : first + int(mask.sum())].all()  # one span
        image_id = tiny_model_config_image_id(family)
        assert (ids[:first] == image_id).any()  # the image comes before the passage
        assert not (ids[mask] == image_id).any()
        assert not mask[0]  # the template's first token (BOS / role) belongs to neither set


def tiny_model_config_image_id(family: str) -> int:
    from hf_normalign.testing import tiny_config

    return tiny_config(family).image_token_id


def test_custom_prompt_and_suffix_tokens():
    proc = tiny_processor("llava")
    sample = encode_probe(proc, default_probe(1), prompt="USER: <image>\n{text} ASSISTANT:")[0]
    ids, mask = sample.input_ids, sample.text_mask
    last = int(mask.nonzero()[-1])
    assert proc.tokenizer.decode(ids[last + 1 :]).strip() == "ASSISTANT:"
    assert ids[0] == proc.tokenizer.bos_token_id and (ids == proc.tokenizer.bos_token_id).sum() == 1
    with pytest.raises(ValueError, match=r"\{text\}"):
        encode_probe(proc, default_probe(1), prompt="no placeholder")


def test_bookkeeping_indices():
    model, proc = tiny_model("llava"), tiny_processor("llava")
    samples = encode_probe(proc, default_probe(5))
    batches = list(capture(model, proc, samples, layers=[1], batch_size=2, progress=False))
    assert [b.sample_indices for b in batches] == [[0, 1], [2, 3], [4]]
    for b in batches:
        for i in b.sample_indices:
            n_vis = int(vision_mask(model, samples[i].input_ids).sum())
            assert b.vision_patch[b.vision_sample == i].tolist() == list(range(n_vis))
            assert b.text_token[b.text_sample == i].tolist() == list(range(samples[i].num_text_tokens))
        assert b.vision[1].dtype == torch.float32 and b.vision_sample.device.type == "cpu"


def _rows(model, proc, samples, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(capture(model, proc, samples, layers=[1, -1], progress=False, **kwargs))
    return torch.cat([b.vision[2] for b in batches]), torch.cat([b.text[2] for b in batches])


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "gemma3"])
def test_batch_size_and_padding_side_do_not_matter(family):
    # Images of different sizes: LLaVA-NeXT tiles and Qwen patch grids differ per sample, so the
    # non-token inputs are padded / concatenated differently in every batch layout.
    model, proc = tiny_model(family), processor_or_skip(family)
    sizes = [(64, 32), (32, 32), (32, 64), (48, 40)]
    probe = Probe.from_pairs(
        (Image.new("RGB", s, (40 * i, 90, 200 - 30 * i)), default_probe(4)[i].text) for i, s in enumerate(sizes)
    )
    samples = encode_probe(proc, probe)
    ref_v, ref_t = _rows(model, proc, samples, batch_size=1)
    for kwargs in (
        {"batch_size": 4},
        {"batch_size": 3, "padding_side": "left"},
        {"batch_size": 4, "padding_side": "left"},
    ):
        v, t = _rows(model, proc, samples, **kwargs)
        torch.testing.assert_close(v, ref_v, **TOL)
        torch.testing.assert_close(t, ref_t, **TOL)


def test_forward_stops_after_the_deepest_selected_layer():
    model, proc = tiny_model("llava", num_hidden_layers=3), tiny_processor("llava")
    layers = get_spec(model).decoder_layers(model)
    calls = {"head": 0, "last": 0}
    model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    layers[2].register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))
    list(capture(model, proc, default_probe(2), layers=[1, 2], progress=False))
    assert calls == {"head": 0, "last": 0}
    list(capture(model, proc, default_probe(2), progress=False))  # up to the final norm, still no LM head
    assert calls == {"head": 0, "last": 1}


def test_resolve_layers():
    model = tiny_model("llava", num_hidden_layers=4)
    view = ModelView.of(model)
    assert view.resolve_layers() == [1, 2, 3, 4]
    assert view.resolve_layers([-1, 2, 2], include_embeddings=True) == [0, 2, 4]
    assert view.resolve_layers([-5]) == [0]
    for bad in ([5], [-6]):
        with pytest.raises(ValueError, match="out of range"):
            view.resolve_layers(bad)


def test_processor_free_encoded_samples():
    # Mistral3 has no tiny processor here: give inputs plus the passage mask directly.
    model = tiny_model("mistral3")
    samples = []
    for i in range(3):
        batch = tiny_batch(model, batch_size=1, seq_text=6 + i, seed=i)
        labels = batch.pop("labels")[0]
        text = labels != -100
        text[0] = False  # BOS is not passage text
        samples.append(EncodedSample(batch, text, f"row {i}"))
    batches = list(capture(model, None, samples, batch_size=3, progress=False))
    for i, sample in enumerate(samples):
        hidden, _, _ = reference_forward(model, sample)
        b = batches[0]
        torch.testing.assert_close(b.text[2][b.text_sample == i], hidden[2][0][sample.text_mask], **TOL)
        torch.testing.assert_close(
            b.vision[2][b.vision_sample == i], hidden[2][0][vision_mask(model, sample.input_ids)], **TOL
        )


def test_low_precision_model_rows():
    model, proc = tiny_model("llava", dtype=torch.bfloat16), tiny_processor("llava")
    batch = next(capture(model, proc, default_probe(2), layers=[1], progress=False))
    assert batch.vision[1].dtype == torch.float32 and torch.isfinite(batch.vision[1]).all()
    batch = next(capture(model, proc, default_probe(2), layers=[1], dtype=None, progress=False))
    assert batch.text[1].dtype == torch.bfloat16


def test_prompt_without_vision_tokens():
    model, proc = tiny_model("llava"), tiny_processor("llava")
    with pytest.raises(ValueError, match="image"):  # the processor itself refuses an image without placeholder
        list(capture(model, proc, default_probe(1), prompt="{text}", progress=False))
    sample = encode_probe(proc, default_probe(1))[0]
    ids = sample.input_ids.clone()
    ids[vision_mask(model, ids)] = 5
    broken = EncodedSample({**sample.inputs, "input_ids": ids[None]}, sample.text_mask, "my-sample")
    with pytest.raises(ValueError, match="my-sample: the prompt has no vision tokens"):
        list(capture(model, proc, [broken], progress=False))
