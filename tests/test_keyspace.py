"""Key-space gap: MMD against a direct O(n^2) float64 loop and the two-Gaussian closed form, JSD against
scipy, PCA against numpy, and the model-level keys against k_proj outputs captured here (every family)."""

import math
import sys

import numpy as np
import pytest
import torch
from helpers import vision_mask
from scipy.spatial.distance import jensenshannon, pdist
from test_profile import BATCH_FAMILIES, PROCESSOR_FAMILIES, _encoded

import hf_normalign.diagnostics.maths.keyspace as ks
import hf_normalign.diagnostics.metrics.keyspace as ksm
from hf_normalign.diagnostics.maths.keyspace import jsd_histograms, jsd_pca, pca_basis, pca_histograms
from hf_normalign.diagnostics.maths.mmd import median_bandwidth, mmd2_rbf, subsample
from hf_normalign.diagnostics.maths.reservoir import Reservoir
from hf_normalign.diagnostics.metrics.keyspace import KeySpaceResult, key_space_from_features, key_space_gap
from hf_normalign.diagnostics.probes import EncodedSample
from hf_normalign.registry import get_spec


def _mmd2_loop(x: np.ndarray, y: np.ndarray, h: float, unbiased: bool) -> float:
    def k(a, b):
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * h * h))

    n, m = len(x), len(y)
    pairs_x = [(i, j) for i in range(n) for j in range(n) if i != j or not unbiased]
    pairs_y = [(i, j) for i in range(m) for j in range(m) if i != j or not unbiased]
    sxx = sum(k(x[i], x[j]) for i, j in pairs_x) / len(pairs_x)
    syy = sum(k(y[i], y[j]) for i, j in pairs_y) / len(pairs_y)
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return sxx + syy - 2 * sxy


def _gaussian_mmd2(d: int, s: float, shift: float, h: float) -> float:
    """Closed form for N(0, s^2 I) vs N(delta, s^2 I), ||delta|| = shift, kernel exp(-||a-b||^2 / (2 h^2)).

    x - x' ~ N(0, 2 s^2 I) and E exp(-||z||^2 / (2 h^2)) = (h^2 / (h^2 + v))^(d/2) exp(-||mu||^2 / (2 (h^2 + v)))
    for z ~ N(mu, v I), so MMD^2 = 2 c (1 - exp(-shift^2 / (2 (h^2 + 2 s^2)))) with c = (h^2 / (h^2 + 2 s^2))^(d/2).
    """
    c = (h * h / (h * h + 2 * s * s)) ** (d / 2)
    return 2 * c * (1 - math.exp(-(shift**2) / (2 * (h * h + 2 * s * s))))


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd2_equals_direct_loop(unbiased):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(15, 3)), rng.normal(size=(11, 3)) + 0.7
    assert mmd2_rbf(x, y, bandwidth=1.3, unbiased=unbiased) == pytest.approx(
        _mmd2_loop(x, y, 1.3, unbiased), rel=1e-10, abs=1e-13
    )
    h = float(np.median(pdist(np.concatenate([x, y]))))
    assert median_bandwidth(x, y) == pytest.approx(h, rel=1e-12)
    assert mmd2_rbf(x, y, unbiased=unbiased) == pytest.approx(_mmd2_loop(x, y, h, unbiased), rel=1e-10, abs=1e-13)


def test_mmd2_identical_distributions_about_zero():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(1000, 6, generator=g), torch.randn(1000, 6, generator=g)
    assert abs(mmd2_rbf(x, y)) < 3e-3
    assert abs(mmd2_rbf(x, x[torch.randperm(1000, generator=g)])) < 1e-3  # same sample, reordered


@pytest.mark.parametrize(("d", "s", "shift", "h"), [(4, 1.0, 1.5, 2.0), (8, 0.5, 1.0, 1.5)])
def test_mmd2_gaussian_shift_closed_form(d, s, shift, h):
    values = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        delta = torch.zeros(d, dtype=torch.float64)
        delta[0] = shift
        x = torch.randn(2000, d, generator=g, dtype=torch.float64) * s
        y = torch.randn(2000, d, generator=g, dtype=torch.float64) * s + delta
        values.append(mmd2_rbf(x, y, bandwidth=h))
    expected = _gaussian_mmd2(d, s, shift, h)
    # ~3 standard errors of the mean of 3 draws; a kernel exp(-||a-b||^2 / h^2) would miss by > 0.02.
    assert np.mean(values) == pytest.approx(expected, abs=0.012)


def test_subsampling_is_seeded_and_uniform_subset():
    x = torch.arange(100, dtype=torch.float64)[:, None]
    a, b = subsample(x, 10, seed=5), subsample(x, 10, seed=5)
    assert torch.equal(a, b) and a.shape == (10, 1) and torch.all(a[1:] > a[:-1])
    assert not torch.equal(a, subsample(x, 10, seed=6))
    y = torch.randn(300, 2, dtype=torch.float64) + 1
    capped = mmd2_rbf(x.repeat(1, 2) / 100, y, max_samples=50, seed=2)
    explicit = mmd2_rbf(subsample(x.repeat(1, 2) / 100, 50, 2), subsample(y, 50, 3), max_samples=None)
    assert capped == pytest.approx(explicit, rel=1e-12)


@pytest.mark.parametrize("base", [2.0, math.e])
def test_jsd_equals_scipy_on_the_same_histograms(base):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 5, generator=g), torch.randn(300, 5, generator=g) * 1.5 + 0.5
    hx, hy, _ = pca_histograms(x, y, dims=2, bins=12, clip_quantile=0.0)
    assert hx.shape == hy.shape == (12, 12) and hx.sum() == 400 and hy.sum() == 300
    expected = jensenshannon(hx.ravel(), hy.ravel(), base=base) ** 2
    assert jsd_histograms(hx, hy, base=base) == pytest.approx(expected, rel=1e-10)
    assert jsd_histograms(hx, hx) == 0.0
    assert jsd_histograms([1, 0, 0], [0, 0, 5]) == pytest.approx(1.0)  # disjoint support: 1 bit
    # jsd_pca is exactly this pipeline.
    assert jsd_pca(x, y, dims=2, bins=12, clip_quantile=0.0, base=base) == pytest.approx(expected, rel=1e-10)


def test_histogram_edges_are_shared_and_clip_into_edge_bins():
    x = np.concatenate([np.random.default_rng(0).normal(size=(200, 3)), [[1e6, 0, 0]]])
    y = np.random.default_rng(1).normal(size=(150, 3))
    hx, hy, edges = pca_histograms(x, y, dims=1, bins=10, clip_quantile=0.01)
    assert hx.sum() == 201 and hy.sum() == 150  # the outlier is kept, in an edge bin
    pooled = np.concatenate([x, y])
    mean, comps, _ = pca_basis(x, y, 1)
    proj = (pooled - mean.numpy()) @ comps.numpy().T
    np.testing.assert_allclose([edges[0][0], edges[0][-1]], np.quantile(proj, [0.01, 0.99]), rtol=1e-10)


@pytest.mark.parametrize("exact_max", [512, 4])
def test_pca_basis_matches_numpy_mixture_covariance(exact_max, monkeypatch):
    monkeypatch.setattr(ks, "_EXACT_PCA_MAX", exact_max)  # 4: the randomized subspace iteration path
    rng = np.random.default_rng(0)
    scales = np.array([6.0, 3.0, 1.5] + [0.3] * 27)
    x = rng.normal(size=(300, 30)) * scales
    y = rng.normal(size=(100, 30)) * scales[::-1] + 1.0
    m = (x.mean(0) + y.mean(0)) / 2
    cov = 0.5 * (x - m).T @ (x - m) / len(x) + 0.5 * (y - m).T @ (y - m) / len(y)  # equal-weight mixture
    evals, evecs = np.linalg.eigh(cov)
    mean, comps, var = pca_basis(x, y, dims=3)
    np.testing.assert_allclose(mean.numpy(), m, rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), evals[::-1][:3], rtol=1e-8)
    np.testing.assert_allclose(np.abs(comps.numpy() @ evecs[:, ::-1][:, :3]), np.eye(3), atol=1e-6)
    assert all(c[np.abs(c).argmax()] > 0 for c in comps.numpy())  # sign convention


def test_gap_exceeds_intra_modal_baseline_on_a_planted_shift():
    g = torch.Generator().manual_seed(0)
    same = key_space_from_features([torch.randn(400, 8, generator=g)], [torch.randn(400, 8, generator=g)])
    shifted = key_space_from_features([torch.randn(400, 8, generator=g) + 1.0], [torch.randn(400, 8, generator=g)])
    assert abs(same.mmd2[0]) < 0.01 and shifted.mmd2[0] > 0.1
    for r in (same, shifted):
        assert abs(r.mmd2_vision_halves[0]) < 0.02 and abs(r.mmd2_text_halves[0]) < 0.02
    assert shifted.jsd[0] > 3 * max(shifted.jsd_vision_halves[0], shifted.jsd_text_halves[0])
    assert set(shifted.scatter["0"]) == {"vision", "text", "variance"} and len(shifted.scatter["0"]["vision"]) == 300


def test_reservoir_keeps_a_seeded_subset_consistent_across_layers():
    res = Reservoir(5, seed=0)
    for start in range(0, 40, 8):
        rows = torch.arange(start, start + 8, dtype=torch.float64)[:, None]
        res.update({1: rows, 2: -rows})
    assert res.seen == 40 and res.rows[1].shape == (5, 1)
    assert torch.equal(res.rows[2], -res.rows[1])  # the same tokens at every layer
    again = Reservoir(5, seed=0)
    for start in range(0, 40, 8):
        again.update({1: torch.arange(start, start + 8, dtype=torch.float64)[:, None]})
    assert torch.equal(again.rows[1], res.rows[1])
    keep_all = Reservoir(None, seed=0)
    keep_all.update({1: torch.ones(3, 1)})
    keep_all.update({1: torch.zeros(2, 1)})
    assert keep_all.rows[1].flatten().tolist() == [1, 1, 1, 0, 0]


def _reference_keys(model, samples, layers):
    """k_proj outputs at vision / text positions, hooked here, one sample at a time."""
    decoder = get_spec(model).decoder_layers(model)
    seen, handles = {}, []
    for k in layers:
        handles.append(decoder[k - 1].self_attn.k_proj.register_forward_hook(
            lambda m, a, out, k=k: seen.__setitem__(k, out)))  # fmt: skip
    vis, txt = {k: [] for k in layers}, {k: [] for k in layers}
    try:
        for s in samples:
            with torch.no_grad():
                model(**s.inputs)
            vmask = vision_mask(model, s.inputs["input_ids"])[0]
            for k in layers:
                vis[k].append(seen[k][0][vmask])
                txt[k].append(seen[k][0][s.text_mask])
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(vis[k]) for k in layers], [torch.cat(txt[k]) for k in layers]


@pytest.mark.parametrize("family", PROCESSOR_FAMILIES + BATCH_FAMILIES)
def test_keys_are_k_proj_outputs_on_every_family(family):
    model, processor, samples = _encoded(family, 3)
    opts = dict(max_samples=None, scatter_points=20, seed=1)
    got = key_space_gap(model, processor, samples, batch_size=2, progress=False, **opts)
    layers = got.layers
    assert layers == [1, 2]
    vis, txt = _reference_keys(model, samples, layers)
    cfg = model.config.get_text_config()
    assert vis[0].shape[1] == cfg.num_key_value_heads * cfg.head_dim < cfg.hidden_size  # GQA keys
    want = key_space_from_features(vis, txt, layers=layers, **opts)
    assert got.jsd_bins == want.jsd_bins
    for key in ("mmd2", "mmd2_vision_halves", "mmd2_text_halves", "bandwidth", "jsd"):
        np.testing.assert_allclose(getattr(got, key), getattr(want, key), rtol=1e-4, atol=1e-7, err_msg=key)
    assert got.num_vision_keys == [len(vis[0])] * 2 and got.num_text_keys == [len(txt[0])] * 2
    assert got.num_samples == 3


def test_model_level_cap_and_errors():
    model, processor, samples = _encoded("qwen2_vl", 3)
    capped = key_space_gap(model, processor, samples, layers=[-1], max_samples=8, progress=False)
    assert capped.layers == [2] and capped.num_vision_used == [8] and capped.num_text_used == [8]
    assert capped.num_vision_keys[0] > 8
    with pytest.raises(ValueError, match="no attention keys"):
        key_space_gap(model, processor, samples, layers=[0], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        key_space_gap(model, processor, samples, layers=[3], progress=False)
    no_text = [EncodedSample(s.inputs, torch.zeros_like(s.text_mask), s.name) for s in samples]
    with pytest.raises(ValueError, match="no text-passage tokens"):
        key_space_gap(model, processor, no_text, progress=False)
    with pytest.raises(ValueError, match="at least 4"):
        key_space_from_features([torch.randn(3, 4)], [torch.randn(10, 4)])
    with pytest.raises(ValueError, match="needs at least 2 rows"):
        mmd2_rbf(torch.randn(1, 4), torch.randn(10, 4))


def test_result_round_trips_through_json():
    r = key_space_from_features([torch.randn(20, 3)], [torch.randn(20, 3)], bins=4)
    back = KeySpaceResult.from_dict(r.to_dict())
    assert back.mmd2 == r.mmd2 and back.scatter == r.scatter and back.settings == r.settings


def test_mmd_and_both_mmd2_estimators_by_hand():
    # Every MMD number of a layer, by hand in float64 with an explicit double loop over the pairs.
    rng = np.random.default_rng(21)
    v, t = rng.normal(size=(12, 3)) + 0.7, rng.normal(size=(9, 3))
    h = 1.7

    def k(a, b):
        return math.exp(-np.sum((a - b) ** 2) / (2 * h * h))

    kvv = [[k(a, b) for b in v] for a in v]
    ktt = [[k(a, b) for b in t] for a in t]
    kvt = sum(k(a, b) for a in v for b in t) / (len(v) * len(t))
    n, m = len(v), len(t)
    off_v = sum(kvv[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    off_t = sum(ktt[i][j] for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    unbiased = off_v + off_t - 2 * kvt
    biased = sum(map(sum, kvv)) / n**2 + sum(map(sum, ktt)) / m**2 - 2 * kvt
    r = key_space_from_features([torch.tensor(v)], [torch.tensor(t)], bandwidth=h, bins=2, max_samples=None)
    assert r.mmd2_unbiased[0] == pytest.approx(unbiased, rel=1e-12)
    assert r.mmd2_biased[0] == pytest.approx(biased, rel=1e-12)
    assert r.mmd[0] == pytest.approx(math.sqrt(biased), rel=1e-12)
    assert r.mmd2[0] == r.mmd2_unbiased[0]
    assert key_space_from_features([v], [t], bandwidth=h, bins=2, unbiased=False).mmd2[0] == pytest.approx(biased)
    assert abs(unbiased - biased) > 1e-3


def _rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    # Llama/Qwen RMSNorm by hand in float64: weight * x / sqrt(mean(x^2) + eps).
    return norm.weight.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.variance_epsilon)


def _keys_by_hand(model, samples, layers, space):
    """Keys of each layer in float64 from an output_hidden_states forward, one sample at a time:
    input_layernorm -> k_proj -> k_norm -> RoPE, all written out here. Only the position embeddings the
    decoder layer receives (and Qwen3-VL's deepstack features, added to the input of layer k + 1 after
    hidden_states[k] is recorded) are taken with plain pre-hooks."""
    decoder = get_spec(model).decoder_layers(model)
    lm = get_spec(model).get(model, get_spec(model).language_model)
    seen, handles = {}, []
    for k in layers:
        handles.append(decoder[k - 1].register_forward_pre_hook(
            lambda m, a, kw, k=k: seen.__setitem__(k, kw["position_embeddings"]), with_kwargs=True))  # fmt: skip
    handles.append(lm.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("lm", kw), with_kwargs=True))
    vis, txt = {k: [] for k in layers}, {k: [] for k in layers}
    try:
        for s in samples:
            with torch.no_grad():
                states = model(**s.inputs, output_hidden_states=True).hidden_states
            deepstack = seen["lm"].get("deepstack_visual_embeds") or []
            vmask = vision_mask(model, s.inputs["input_ids"])[0]
            for k in layers:
                attn = decoder[k - 1].self_attn
                h = states[k - 1][0].double().clone()
                if 0 <= k - 2 < len(deepstack):
                    h[vmask] += deepstack[k - 2].double()
                h = _rms(h, decoder[k - 1].input_layernorm)
                key = h @ attn.k_proj.weight.double().T
                if attn.k_proj.bias is not None:
                    key = key + attn.k_proj.bias.double()
                key = key.view(h.shape[0], -1, attn.head_dim)  # [L, kv heads, head_dim]
                if space != "k_proj" and getattr(attn, "k_norm", None) is not None:
                    key = _rms(key, attn.k_norm)
                if space == "post_rope":
                    cos, sin = (t[0].double()[:, None, :] for t in seen[k])  # [L, 1, head_dim]
                    half = key.shape[-1] // 2
                    rotated = torch.cat([-key[..., half:], key[..., :half]], dim=-1)
                    key = key * cos + rotated * sin
                key = key.reshape(h.shape[0], -1)
                vis[k].append(key[vmask])
                txt[k].append(key[s.text_mask])
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(vis[k]) for k in layers], [torch.cat(txt[k]) for k in layers]


@pytest.mark.parametrize("family", ["qwen3_vl", "llava"])
def test_key_spaces_equal_keys_by_hand(family):
    model, processor, samples = _encoded(family, 3)
    has_norm = family == "qwen3_vl"
    opts = dict(max_samples=None, scatter_points=20, seed=1)
    stats = ("mmd2", "mmd2_biased", "mmd2_vision_halves", "mmd2_text_halves", "bandwidth", "jsd")
    got = {}
    for space in ("k_proj", "post_norm", "post_rope"):
        got[space] = key_space_gap(model, processor, samples, batch_size=2, progress=False, keys=space, **opts)
        vis, txt = _keys_by_hand(model, samples, got[space].layers, space)
        want = key_space_from_features(vis, txt, layers=got[space].layers, **opts)
        for key in stats:
            np.testing.assert_allclose(
                getattr(got[space], key), getattr(want, key), rtol=1e-4, atol=1e-7, err_msg=f"{space} {key}"
            )
        assert got[space].settings["key_space"] == space
    # The three spaces differ where they should: k_norm changes the keys only where the model has one.
    assert (got["post_norm"].bandwidth != got["k_proj"].bandwidth) == has_norm
    assert got["post_rope"].bandwidth != got["post_norm"].bandwidth
    assert ("equal to the k_proj output" in got["post_norm"].settings["keys"]) == (not has_norm)
    with pytest.raises(ValueError, match="keys must be one of"):
        key_space_gap(model, processor, samples, keys="post_attention", progress=False)


def test_tsne_next_to_pca_is_sklearn_on_the_scatter_points_seeded():
    pytest.importorskip("sklearn")
    from sklearn.manifold import TSNE

    g = torch.Generator().manual_seed(4)
    v, t = (
        torch.randn(40, 6, generator=g, dtype=torch.float64) + 2.5,
        torch.randn(30, 6, generator=g, dtype=torch.float64),
    )
    opts = dict(bins=3, scatter_points=100, max_samples=None, seed=3)  # every row is a scatter point
    r = key_space_from_features([v], [t], tsne=True, **opts)
    pts = r.scatter["0"]["tsne"]
    assert len(pts["vision"]) == 40 and len(pts["text"]) == 30
    # By hand: scikit-learn on the pooled rows (vision first, original order), perplexity min(30, (n-1)/3).
    want = TSNE(n_components=2, perplexity=min(30, 69 / 3), init="pca", random_state=3).fit_transform(
        torch.cat([v, t]).numpy()
    )
    np.testing.assert_allclose(np.array(pts["vision"] + pts["text"]), want, rtol=1e-6, atol=1e-6)
    assert key_space_from_features([v], [t], tsne=True, **opts).scatter == r.scatter  # seeded: same points
    emb = np.array(pts["vision"] + pts["text"])  # the planted shift keeps two clouds: 1-NN never crosses
    nearest = np.argsort(((emb[:, None] - emb[None]) ** 2).sum(-1), axis=1)[:, 1]
    assert ((nearest < 40) == (np.arange(70) < 40)).mean() > 0.95
    assert "tsne" not in key_space_from_features([v], [t], **opts).scatter["0"]  # off by default


def test_tsne_without_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r'pip install "hf-normalign\[tsne\]"'):
        key_space_from_features([torch.randn(20, 3)], [torch.randn(20, 3)], tsne=True)
    model, processor, samples = _encoded("llava", 2)
    calls = []
    monkeypatch.setattr(ksm, "prepare_probe", lambda *a, **k: calls.append(1))
    with pytest.raises(ImportError, match=r"hf-normalign\[tsne\]"):  # before the probe is even encoded
        key_space_gap(model, processor, samples, tsne=True, progress=False)
    assert calls == []
