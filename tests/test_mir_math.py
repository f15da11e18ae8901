"""MIR: compared with the reference algorithm re-implemented here from its formulas (numpy + scipy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from hf_normalign.diagnostics.metrics.mir import MIRResult, StreamingMIR, mir_from_features

NUM_PLANTED = 3


# --- the reference algorithm, written from the formulas -------------------------------------------


def ref_fid(v: np.ndarray, t: np.ndarray) -> float:
    sv, st = np.cov(v, rowvar=False), np.cov(t, rowvar=False)
    diff = v.mean(0) - t.mean(0)
    return float(diff @ diff + np.trace(sv) + np.trace(st) - 2 * np.trace(scipy.linalg.sqrtm(sv @ st).real))


def lower_median(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """torch.median's convention, by hand: the lower of the two middle values for an even count."""
    return np.take(np.sort(x, axis=axis), (x.shape[axis] - 1) // 2, axis=axis)


def ref_outliers(x: np.ndarray, mode: str, stats: str = "torch") -> np.ndarray:
    """The reference's rules; stats="torch": lower median and std ddof 1 (torch), "numpy": np.median, ddof 0."""
    norms = np.linalg.norm(x, axis=1)
    median = lower_median if stats == "torch" else np.median
    if mode == "iqr":
        q1, q3 = np.percentile(norms, [25, 75])
        out = (norms < q1 - 1.5 * (q3 - q1)) | (norms > q3 + 1.5 * (q3 - q1))
    else:
        out = np.abs(norms - median(norms)) > 3 * np.std(norms, ddof=1 if stats == "torch" else 0)
    if mode in ("replace_median", "iqr"):
        x = x.copy()
        x[out] = median(x, axis=0)
    elif mode == "drop":
        x = x[~out]
    return x


def ref_mir(
    vision: list[np.ndarray], text: list[np.ndarray], mode: str, scale_first: bool = True, stats: str = "torch"
):
    fids = []
    for v, t in zip(vision, text, strict=True):
        if scale_first:
            alpha = 1 / np.linalg.norm(t, axis=1).mean()
            v, t = ref_outliers(v * alpha, mode, stats), ref_outliers(t * alpha, mode, stats)
        else:  # the wrong order, to show the tests can tell
            v, t = ref_outliers(v, mode, stats), ref_outliers(t, mode, stats)
            alpha = 1 / np.linalg.norm(t, axis=1).mean()
            v, t = v * alpha, t * alpha
        fids.append(ref_fid(v, t))
    return math.log10(sum(fids)), fids


# --- data -------------------------------------------------------------------------------------------


def features(seed: int, layers: int = 3, d: int = 16, n_vis: int = 300, n_txt: int = 200):
    """Per-layer vision/text features (even row counts) with NUM_PLANTED rows x50 in each modality."""
    rng = np.random.default_rng(seed)
    vision, text = [], []
    for k in range(layers):
        v = rng.normal(size=(n_vis, d)) @ (np.eye(d) + 0.2 * rng.normal(size=(d, d))) * (1 + k) + 2.0
        t = rng.normal(size=(n_txt, d)) * rng.uniform(0.5, 1.5, d) + 0.5
        v[rng.choice(n_vis, NUM_PLANTED, replace=False)] *= 50
        t[rng.choice(n_txt, NUM_PLANTED, replace=False)] *= 50
        vision.append(v)
        text.append(t)
    return vision, text


# --- mir_from_features -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["replace_median", "iqr", "drop", "none"])
def test_matches_reference_algorithm(mode: str) -> None:
    vision, text = features(0)
    expected_mir, expected = ref_mir(vision, text, mode)
    res = mir_from_features(vision, text, outliers=mode)
    np.testing.assert_allclose(res.per_layer, expected, rtol=1e-6)
    assert res.mir == pytest.approx(expected_mir, rel=1e-6)
    if mode == "iqr":  # the quartile rule also flags some of the normal rows; counted in test_iqr_rule_*
        return
    planted = 0 if mode == "none" else NUM_PLANTED
    assert res.num_vision_outliers == [planted] * 3
    assert res.num_text_outliers == [planted] * 3
    assert res.num_vision_tokens == [300 - planted * (mode == "drop")] * 3
    assert res.text_scale == pytest.approx([1 / np.linalg.norm(t, axis=1).mean() for t in text], rel=1e-12)


def test_fewer_tokens_than_dim_and_torch_inputs() -> None:
    # 30 text tokens in 48 dims: the low-rank route; torch float32 input is upcast.
    vision, text = features(1, layers=2, d=48, n_vis=400, n_txt=30)
    _, expected = ref_mir(vision, text, "replace_median")
    res = mir_from_features([torch.tensor(v) for v in vision], [torch.tensor(t) for t in text])
    np.testing.assert_allclose(res.per_layer, expected, rtol=1e-6)
    as_f32 = mir_from_features([torch.tensor(v, dtype=torch.float32) for v in vision], text)
    rounded = [v.astype(np.float32).astype(np.float64) for v in vision]
    _, expected_f32 = ref_mir(rounded, text, "replace_median")
    np.testing.assert_allclose(as_f32.per_layer, expected_f32, rtol=1e-6)


@pytest.mark.parametrize("mode", ["replace_median", "drop"])
def test_text_scale_is_computed_before_outlier_handling(mode: str) -> None:
    vision, text = features(2)
    res = mir_from_features(vision, text, outliers=mode)
    _, scale_first = ref_mir(vision, text, mode)
    _, scale_after = ref_mir(vision, text, mode, scale_first=False)
    # The planted x50 text rows move the mean norm a lot, so the two orders are far apart.
    assert not np.allclose(scale_first, scale_after, rtol=1e-2)
    np.testing.assert_allclose(res.per_layer, scale_first, rtol=1e-6)


def _crafted_norms() -> np.ndarray:
    """20 norms (even count: the two medians differ) with one row flagged by numpy's rule only."""
    base = np.linspace(1.0, 2.0, 19)
    for c in np.linspace(2.0, 20.0, 2001):
        norms = np.r_[base, c]
        if 3 * np.std(norms) < abs(c - np.median(norms)) <= 3 * np.std(norms, ddof=1):
            return norms
    pytest.fail("no discriminating norm found")


@pytest.mark.parametrize("mode", ["replace_median", "drop"])
def test_outlier_statistics_torch_by_default_numpy_as_option(mode: str) -> None:
    # Features that differ only in how the statistics are taken: the default must follow torch
    # (std ddof 1, lower median), outlier_stats="numpy" must follow numpy (ddof 0, mean of middles).
    rng = np.random.default_rng(3)
    norms = _crafted_norms()
    directions = rng.normal(size=(20, 8))
    vision = [directions / np.linalg.norm(directions, axis=1, keepdims=True) * norms[:, None]]
    text = [rng.normal(size=(30, 8)) + 0.3]
    _, torch_ref = ref_mir(vision, text, mode, stats="torch")
    _, numpy_ref = ref_mir(vision, text, mode, stats="numpy")
    assert not np.allclose(torch_ref, numpy_ref, rtol=1e-3)
    default = mir_from_features(vision, text, outliers=mode)
    numpy_opt = mir_from_features(vision, text, outliers=mode, outlier_stats="numpy")
    np.testing.assert_allclose(default.per_layer, torch_ref, rtol=1e-9)
    np.testing.assert_allclose(numpy_opt.per_layer, numpy_ref, rtol=1e-9)
    assert default.num_vision_outliers == [0] and numpy_opt.num_vision_outliers == [1]
    assert default.settings["outlier_stats"] == "torch"


def test_replacement_value_is_the_lower_median() -> None:
    # No threshold question here: one far row is flagged under both rules, and only the replacement
    # value (the per-dimension median of an even number of rows) tells torch from numpy.
    rng = np.random.default_rng(11)
    vision = rng.normal(size=(40, 6)) + 1.0
    vision[0] *= 100
    text = rng.normal(size=(30, 6))
    torch_res = mir_from_features([vision], [text])
    numpy_res = mir_from_features([vision], [text], outlier_stats="numpy")
    _, torch_ref = ref_mir([vision], [text], "replace_median", stats="torch")
    _, numpy_ref = ref_mir([vision], [text], "replace_median", stats="numpy")
    assert torch_res.per_layer == pytest.approx(torch_ref, rel=1e-9)
    assert numpy_res.per_layer == pytest.approx(numpy_ref, rel=1e-9)
    assert torch_ref != pytest.approx(numpy_ref, rel=1e-6)


def test_iqr_rule_flags_by_quartiles() -> None:
    # Norms 1..20 plus two at 40; quartiles by hand with np.percentile (linear interpolation).
    norms = np.r_[np.arange(1.0, 21.0), 40.0, 40.0]
    q1, q3 = np.percentile(norms, [25, 75])
    expected = int(((norms < q1 - 1.5 * (q3 - q1)) | (norms > q3 + 1.5 * (q3 - q1))).sum())
    assert expected == 2
    rng = np.random.default_rng(5)
    d = rng.normal(size=(len(norms), 4))
    vision = d / np.linalg.norm(d, axis=1, keepdims=True) * norms[:, None]
    res = mir_from_features([vision], [rng.normal(size=(30, 4))], outliers="iqr")
    assert res.num_vision_outliers == [expected]
    assert res.settings["outlier_threshold"] == 1.5
    sigma = mir_from_features([vision], [rng.normal(size=(30, 4))])
    assert sigma.num_vision_outliers == [0]  # 40 is within median + 3 std: only the IQR rule flags it


def test_text_scale_switch() -> None:
    vision, text = features(8, layers=2)
    off = mir_from_features(vision, text, outliers="none", text_scale=False)
    expected = [ref_fid(v, t) for v, t in zip(vision, text, strict=True)]
    np.testing.assert_allclose(off.per_layer, expected, rtol=1e-9)
    assert off.text_scale == [1.0, 1.0]
    on = mir_from_features(vision, text, outliers="none")
    assert not np.allclose(on.per_layer, off.per_layer, rtol=1e-2)


@pytest.mark.filterwarnings("ignore:sum of per-layer FIDs is negative")
def test_sqrt_modes() -> None:
    vision, text = features(4)
    exact = mir_from_features(vision, text, outliers="none")
    ns = mir_from_features(vision, text, outliers="none", sqrt="newton_schulz")
    np.testing.assert_allclose(ns.per_layer, exact.per_layer, rtol=1e-10)
    fast = mir_from_features(vision, text, outliers="none", sqrt="reference_fast")
    for fid, v, t in zip(fast.per_layer, vision, text, strict=True):
        alpha = 1 / np.linalg.norm(t, axis=1).mean()
        sv, st = np.cov(v * alpha, rowvar=False), np.cov(t * alpha, rowvar=False)
        diff = alpha * (v.mean(0) - t.mean(0))
        expected = diff @ diff + np.trace(sv) + np.trace(st) - 2 * np.trace(sv @ st)
        assert fid == pytest.approx(expected, rel=1e-10)


def test_log_base_and_layer_indices() -> None:
    vision, text = features(5, layers=2)
    res = mir_from_features(vision, text, log_base=math.e, layer_indices=[3, 9], num_samples=7)
    assert res.mir == pytest.approx(math.log(sum(res.per_layer)), rel=1e-12)
    assert res.layers == [3, 9]
    assert res.num_samples == 7
    assert res.settings["log_base"] == math.e


def test_zero_and_negative_sums() -> None:
    x = np.array([[0.0], [2.0], [4.0]])
    with pytest.warns(UserWarning, match="is 0"):
        res = mir_from_features([x, x], [x.copy(), x.copy()])
    assert res.mir == float("-inf")
    vision, text = features(4)  # large vision covariances: tr(S_V S_T) outgrows the other terms
    with pytest.warns(UserWarning, match="negative"):
        res = mir_from_features(vision, text, outliers="none", sqrt="reference_fast")
    assert math.isnan(res.mir)
    assert sum(res.per_layer) < 0


LAYERS_4_7 = {"layer_indices": [4, 7]}


@pytest.mark.parametrize(
    ("kwargs", "vision", "text", "match"),
    [
        ({}, [np.ones((5, 3))], [np.ones((5, 3))] * 2, "1 vision layers but 2 text layers"),
        ({}, [], [], "no layers"),
        (LAYERS_4_7, [np.eye(4)] * 2, [np.eye(4), np.ones((1, 4))], r"layer 7: text .*at least 2"),
        (LAYERS_4_7, [np.eye(4), np.full((4, 4), np.inf)], [np.eye(4)] * 2, r"layer 7: .*non-finite"),
        ({}, [np.eye(4)], [np.ones((5, 3))], "layer 0: vision dim 4 != text dim 3"),
        ({}, [np.eye(4)], [np.zeros((5, 4))], "layer 0: .*zero mean norm"),
        ({"outliers": "remove"}, [np.eye(4)], [np.eye(4)], "replace_median, iqr, drop, none"),
        ({"outlier_stats": "scipy"}, [np.eye(4)], [np.eye(4)], "torch, numpy"),
        ({"outlier_threshold": -1}, [np.eye(4)], [np.eye(4)], "outlier_threshold"),
        ({"sqrt": "sqrtm"}, [np.eye(4)], [np.eye(4)], "exact, newton_schulz, reference_fast"),
        ({"log_base": 1}, [np.eye(4)], [np.eye(4)], "log_base"),
        ({"layer_indices": [1, 2]}, [np.eye(4)], [np.eye(4)], "layer_indices has 2 entries"),
    ],
)
def test_errors(kwargs: dict, vision: list, text: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mir_from_features(vision, text, **kwargs)


def test_result_json_round_trip_and_table() -> None:
    vision, text = features(7, layers=2)
    extra = {"final_norm": False}
    res = mir_from_features(vision, text, layer_indices=[1, 2], num_samples=4, extra_settings=extra)
    assert res.settings["final_norm"] is False
    back = MIRResult.from_dict(json.loads(json.dumps(res.to_dict(), allow_nan=False)))
    assert back == res
    degenerate = MIRResult(mir=float("-inf"), per_layer=[0.0], layers=[0], num_samples=None, settings={})
    assert MIRResult.from_dict(json.loads(json.dumps(degenerate.to_dict(), allow_nan=False))) == degenerate
    text_out = str(res)
    assert text_out.startswith(f"MIR = {res.mir:.4f}")
    assert len(res.format_table().splitlines()) == 2 + 2


# --- streaming -------------------------------------------------------------------------------------


def batches(vision: list[np.ndarray], text: list[np.ndarray], sizes: list[int], seed: int):
    """Split every layer's rows into batches (same split across layers), in a shuffled order."""
    rng = np.random.default_rng(seed)
    v_cuts = np.cumsum(sizes)[:-1] * vision[0].shape[0] // sum(sizes)
    t_cuts = np.cumsum(sizes)[:-1] * text[0].shape[0] // sum(sizes)
    v_parts = [np.split(v, v_cuts) for v in vision]
    t_parts = [np.split(t, t_cuts) for t in text]
    order = rng.permutation(len(sizes))
    return [([torch.tensor(p[i]) for p in v_parts], [torch.tensor(p[i]) for p in t_parts]) for i in order]


@pytest.mark.parametrize("mode", ["none", "drop"])
@pytest.mark.parametrize("sqrt", ["exact", "reference_fast"])
@pytest.mark.filterwarnings("ignore:sum of per-layer FIDs is negative")
def test_streaming_equals_in_memory(mode: str, sqrt: str) -> None:
    vision, text = features(8)
    expected = mir_from_features(vision, text, outliers=mode, sqrt=sqrt, layer_indices=[2, 4, 6])
    acc = StreamingMIR(outliers=mode, sqrt=sqrt, layer_indices=[2, 4, 6])
    assert acc.passes_required == (2 if mode == "drop" else 1)
    for p in range(acc.passes_required):
        # Different batching and order in each pass; one batch has 1 vision row and no text row.
        for vb, tb in batches(vision, text, [1, 50, 100, 149] if p == 0 else [60, 60, 60, 120], seed=p):
            acc.update(vb, tb, num_samples=1)
        acc.end_pass()
    res = acc.result()
    np.testing.assert_allclose(res.per_layer, expected.per_layer, rtol=1e-8)
    np.testing.assert_allclose(res.mir, expected.mir, rtol=1e-8)  # NaN for reference_fast here
    assert res.num_vision_tokens == expected.num_vision_tokens
    assert res.num_text_outliers == expected.num_text_outliers
    assert res.num_samples == 4
    assert res.settings["streaming"] is True


def test_streaming_errors() -> None:
    with pytest.raises(ValueError, match="replace_median"):
        StreamingMIR(outliers="replace_median")
    vision, text = features(9, layers=2)
    acc = StreamingMIR(outliers="drop")
    acc.update(vision, text)
    with pytest.raises(RuntimeError, match="needs 2 pass"):
        acc.result()
    acc.end_pass()
    acc.update([v[:-1] for v in vision], text)  # the second pass must see the same data
    with pytest.raises(ValueError, match="same data"):
        acc.result()
    acc = StreamingMIR()
    acc.update(vision, text)
    with pytest.raises(ValueError, match="earlier batches had 2"):
        acc.update(vision[:1], text[:1])
    with pytest.raises(ValueError, match=r"layer 1: .*non-finite"):
        acc.update(vision, [text[0], np.full_like(text[1], np.nan)])


def test_streaming_memory_does_not_grow() -> None:
    rng = np.random.default_rng(10)
    acc = StreamingMIR(outliers="none")
    for _ in range(20):
        acc.update([rng.normal(size=(64, 8))], [rng.normal(size=(32, 8))])
    state = acc._layers[0]  # type: ignore[index]
    assert state.vision.count == 20 * 64
    assert state.vision.cov.shape == (8, 8)
    assert not state.vision_norms and not state.text_norms
