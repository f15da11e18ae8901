"""Visual degradation: effective dimension and correlation against numpy, contrast ratio against a pair
loop, linear probe against a primal ridge solve and on planted cases, the token layout against image
perturbations on every family, and the model-level metrics against output_hidden_states."""

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import processor_or_skip
from helpers import vision_mask
from PIL import Image
from test_profile import PROCESSOR_FAMILIES

from hf_normalign.diagnostics.engine import capture
from hf_normalign.diagnostics.maths import degradation as dgm
from hf_normalign.diagnostics.maths.degradation import (
    contrast_ratio,
    linear_probe_accuracy,
    mean_abs_offdiag_correlation,
    mean_offdiag_correlation,
    participation_ratio,
    patch_labels_for_grid,
)
from hf_normalign.diagnostics.metrics.degradation import (
    DegradationResult,
    degradation_from_features,
    visual_degradation,
)
from hf_normalign.diagnostics.metrics.token_grid import token_grid
from hf_normalign.diagnostics.probes import (
    SHAPE_CLASSES,
    LabelledProbe,
    Probe,
    default_probe,
    encode_probe,
    shapes_probe,
)
from hf_normalign.diagnostics.probes.shapes import resolve_labelled
from hf_normalign.testing import tiny_model, tiny_processor


@pytest.mark.parametrize("shape", [(50, 8), (6, 20)])  # more rows than dims, and fewer
def test_participation_ratio_equals_numpy_eigenvalues(shape):
    x = np.random.default_rng(0).normal(size=shape) * np.linspace(3, 0.2, shape[1])
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    assert participation_ratio(x) == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-10)
    assert participation_ratio(np.eye(5)) == pytest.approx(4.0)  # n - 1 equal directions
    with pytest.raises(ValueError, match="no variance"):
        participation_ratio(np.ones((4, 3)))


@pytest.mark.parametrize("axis", ["features", "samples"])
def test_offdiag_correlation_equals_numpy_corrcoef(axis):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 12))
    x[:, 3] = 2 * x[:, 1] + 0.1 * rng.normal(size=30)
    r = np.corrcoef(x, rowvar=axis == "samples")
    x[:, 5] = -3 * x[:, 2] + 0.1 * rng.normal(size=30)  # a strong negative correlation: signed and |r| differ
    r = np.corrcoef(x, rowvar=axis == "samples")
    off = r[~np.eye(len(r), dtype=bool)]
    assert mean_abs_offdiag_correlation(x, axis=axis, chunk=5) == pytest.approx(np.abs(off).mean(), rel=1e-10)
    assert mean_offdiag_correlation(x, axis=axis, chunk=5) == pytest.approx(off.mean(), rel=1e-10)
    assert abs(off.mean() - np.abs(off).mean()) > 0.01
    x[:, 7] = 4.0  # a constant feature has no correlation: left out
    if axis == "features":
        keep = [i for i in range(12) if i != 7]
        r = np.corrcoef(x[:, keep], rowvar=False)
        assert mean_abs_offdiag_correlation(x) == pytest.approx(np.abs(r[~np.eye(11, dtype=bool)]).mean())


def test_contrast_ratio_equals_pair_loop():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(14, 5))
    labels = np.array([0, 0, 1, 1, 1, -1, 2, 0, 0, 1, 1, -1, 2, 2])
    groups = np.array([0] * 7 + [1] * 7)
    same, diff = [], []
    for i in range(14):
        for j in range(i + 1, 14):
            if groups[i] != groups[j] or labels[i] < 0 or labels[j] < 0:
                continue
            cos = x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
            (same if labels[i] == labels[j] else diff).append(cos)
    s = contrast_ratio(x, labels, groups=groups)
    assert s.cohesion == pytest.approx(np.mean(same), rel=1e-12)
    assert s.coupling == pytest.approx(np.mean(diff), rel=1e-12)
    assert s.ratio == pytest.approx(np.mean(same) / np.mean(diff), rel=1e-12)  # the paper's ratio
    assert s.ratio_shifted == pytest.approx((1 + np.mean(same)) / (1 + np.mean(diff)), rel=1e-12)
    assert (s.same_pairs, s.different_pairs) == (len(same), len(diff))


def test_contrast_ratio_planted_objects_and_random_labels():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(4, 16)) * 3
    labels = np.repeat(np.arange(4), 10)
    x = centers[labels] + rng.normal(size=(40, 16))
    planted = contrast_ratio(x, labels)
    assert planted.cohesion > 0.8 and planted.ratio_shifted > 1.5
    shuffled = contrast_ratio(x, rng.permutation(labels))
    assert shuffled.ratio_shifted == pytest.approx(1.0, abs=0.1)
    anti = contrast_ratio(np.array([[1.0, 0], [1, 0.01], [-1, 0], [-1, 0.01]]), [0, 0, 1, 1])
    assert anti.coupling < -0.99 and anti.ratio_shifted > 100  # negative coupling: still defined, large
    assert anti.ratio < 0  # the paper's ratio changes sign there
    with pytest.raises(ValueError, match="same-object"):
        contrast_ratio(x[:3], [0, 1, 2])


def test_paper_ratio_and_shifted_ratio_can_move_apart():
    # The example: cohesion / coupling 0.5 / 0.2 -> 0.9 / 0.5. Unit vectors built so that the two
    # same-object pairs have cosine c and the cross-object pairs cosine p (by hand: 2-D angles).
    def stats(c: float, p: float):
        a = np.arccos(c)
        # tokens 0,1 of object 0 at angles 0, a; tokens 2,3 of object 1 at angles t, t + a
        # choose t so that the mean cross cosine is p: mean of cos(t), cos(t+a), cos(t-a), cos(t) = p
        t = np.arccos(p / ((2 + 2 * np.cos(a)) / 4))
        ang = np.array([0, a, t, t + a])
        x = np.stack([np.cos(ang), np.sin(ang)], 1)
        return contrast_ratio(x, [0, 0, 1, 1])

    before, after = stats(0.5, 0.2), stats(0.9, 0.5)
    assert (before.cohesion, before.coupling) == pytest.approx((0.5, 0.2), abs=1e-9)
    assert (after.cohesion, after.coupling) == pytest.approx((0.9, 0.5), abs=1e-9)
    assert before.ratio == pytest.approx(0.5 / 0.2) and after.ratio == pytest.approx(0.9 / 0.5)
    assert after.ratio < before.ratio and after.ratio_shifted > before.ratio_shifted


def test_linear_probe_planted_and_shuffled():
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 30)
    x = rng.normal(size=(90, 40))
    x[:, :3] += 6.0 * np.eye(3)[y]
    assert linear_probe_accuracy(x, y) >= 0.95
    shuffled = [linear_probe_accuracy(x, rng.permutation(y), seed=s) for s in range(4)]
    assert abs(np.mean(shuffled) - 1 / 3) < 0.1  # chance


def _primal_probe(x, y, folds, seed, ridge):
    """The documented method, solved in the primal with numpy: (X^T X + ridge d I) W = X^T (Y - mean)."""
    fold = dgm._stratified_folds(y, folds, seed)
    d, correct = x.shape[1], 0
    for f in range(folds):
        tr, te = fold != f, fold == f
        mu, sd = x[tr].mean(0), x[tr].std(0)
        sd[sd < 1e-12] = 1
        xtr, xte = (x[tr] - mu) / sd, (x[te] - mu) / sd
        onehot = np.eye(y.max() + 1)[y[tr]]
        w = np.linalg.solve(xtr.T @ xtr + ridge * d * np.eye(d), xtr.T @ (onehot - onehot.mean(0)))
        correct += int(((xte @ w + onehot.mean(0)).argmax(1) == y[te]).sum())
    return correct / len(y)


def test_linear_probe_equals_primal_ridge_and_stratifies():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 45)
    x = rng.normal(size=(45, 6)) + 0.8 * np.eye(6)[y]
    x[:, 5] = 1.0  # a constant feature
    for folds, ridge in ((3, 1.0), (5, 0.05)):
        assert linear_probe_accuracy(x, y, folds=folds, ridge=ridge, seed=1) == _primal_probe(x, y, folds, 1, ridge)
    fold = dgm._stratified_folds(y, 5, 0)
    for c in range(3):  # each class spread evenly over the folds
        counts = np.bincount(fold[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="2 classes"):
        linear_probe_accuracy(x, np.zeros(45))
    with pytest.raises(ValueError, match="folds"):
        linear_probe_accuracy(x[:3], y[:3], folds=5)


def test_patch_labels_for_grid_majority_and_coverage():
    m = -np.ones((6, 6), dtype=int)
    m[:, :3] = 0  # left half: object 0
    m[:2, 4:] = 1  # 4 of the 9 pixels of the top-right cell of a 2 x 2 grid
    assert patch_labels_for_grid(m, 2, 2).tolist() == [0, 1, 0, -1]
    assert patch_labels_for_grid(m, 2, 2, min_coverage=0.5).tolist() == [0, -1, 0, -1]
    assert patch_labels_for_grid(m, 3, 3).tolist() == [0, 0, 1, 0, 0, -1, 0, 0, -1]


def test_shapes_probe_is_deterministic_and_labelled():
    a, b = shapes_probe(6, seed=3), shapes_probe(6, seed=3)
    assert a.image_labels == b.image_labels == [0, 1, 2, 0, 1, 2]
    assert all(np.array_equal(x, y) for x, y in zip(a.label_maps, b.label_maps, strict=True))
    img = np.asarray(a.probe[0].load_image())
    assert img.shape == (336, 336, 3) and np.array_equal(img, np.asarray(b.probe[0].load_image()))
    for m in a.label_maps:
        objects = set(np.unique(m)) - {-1}
        assert 2 <= len(objects) <= 4 and objects == set(range(len(objects)))
        assert (m >= 0).mean() > 0.3  # objects cover a good part of the image
    sub = resolve_labelled(a, None, None, 2, seed=0)  # a seeded subset keeps labels aligned
    assert len(sub.samples) == 2 and sub.class_names == list(SHAPE_CLASSES)
    assert all(s.name.endswith(SHAPE_CLASSES[y]) for s, y in zip(sub.samples, sub.image_labels, strict=True))


@pytest.mark.parametrize("family", PROCESSOR_FAMILIES)
def test_token_grid_follows_the_image_layout(family):
    """Brighten one quadrant of a grey image: the vision tokens that change most sit in that quadrant
    of the grid the metric assumes (row-major; LLaVA-NeXT/OneVision: the overview tile first)."""
    model, processor = tiny_model(family), processor_or_skip(family)
    size, half = 256, 128
    images = [Image.new("RGB", (size, size), (128, 128, 128))]
    quadrants = [(0, 0), (1, 0), (0, 1), (1, 1)]
    for qx, qy in quadrants:
        img = images[0].copy()
        img.paste((255, 0, 0), (qx * half, qy * half, qx * half + half, qy * half + half))
        images.append(img)
    probe = Probe.from_pairs([(img, "a red square") for img in images])
    batch = next(iter(capture(model, processor, probe, layers=[0], batch_size=5, progress=False)))
    per_image = [batch.vision[0][batch.vision_sample == i] for i in range(5)]
    first, rows, cols = token_grid(model, per_image[0].shape[0])
    assert rows == cols and rows % 2 == 0
    for (qx, qy), feats in zip(quadrants, per_image[1:], strict=True):
        change = (feats - per_image[0]).norm(dim=1)[first : first + rows * cols].reshape(rows, cols)
        h = rows // 2
        sums = {(x, y): float(change[y * h : (y + 1) * h, x * h : (x + 1) * h].sum()) for x, y in quadrants}
        assert max(sums, key=sums.get) == (qx, qy)


def test_visual_degradation_equals_output_hidden_states():
    model, processor = tiny_model("llava"), tiny_processor("llava")
    lp = shapes_probe(9, seed=1)
    res = visual_degradation(model, processor, lp, folds=3, final_norm=True, batch_size=4, progress=False)
    samples = encode_probe(processor, lp.probe)
    pooled = [[] for _ in range(3)]
    cos_same, cos_diff = [[] for _ in range(3)], [[] for _ in range(3)]
    for s, label_map in zip(samples, lp.label_maps, strict=True):
        with torch.no_grad():
            states = model(**s.inputs, output_hidden_states=True).hidden_states
        vmask = vision_mask(model, s.inputs["input_ids"])[0]
        side = math.isqrt(int(vmask.sum()))
        labels = patch_labels_for_grid(label_map, side, side)
        for layer in range(3):
            v = states[layer][0][vmask].double().numpy()
            pooled[layer].append(v.mean(0))
            for i in range(len(v)):
                for j in range(i + 1, len(v)):
                    if labels[i] >= 0 and labels[j] >= 0:
                        cos = v[i] @ v[j] / (np.linalg.norm(v[i]) * np.linalg.norm(v[j]))
                        (cos_same if labels[i] == labels[j] else cos_diff)[layer].append(cos)
    for layer in range(3):
        x = np.stack(pooled[layer])
        lam = np.linalg.eigvalsh(np.cov(x, rowvar=False))
        assert res.effective_dim[layer] == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-4)
        r = np.corrcoef(x, rowvar=False)
        assert res.offdiag_corr[layer] == pytest.approx(np.abs(r[~np.eye(len(r), dtype=bool)]).mean(), rel=1e-4)
        assert res.offdiag_corr_signed[layer] == pytest.approx(r[~np.eye(len(r), dtype=bool)].mean(), rel=1e-4)
        assert res.contrast_ratio[layer] == pytest.approx(np.mean(cos_same[layer]) / np.mean(cos_diff[layer]), rel=1e-4)
        assert res.cohesion[layer] == pytest.approx(np.mean(cos_same[layer]), rel=1e-4)
        assert res.coupling[layer] == pytest.approx(np.mean(cos_diff[layer]), rel=1e-4)
        assert res.probe_accuracy[layer] == pytest.approx(linear_probe_accuracy(x, lp.image_labels, folds=3), abs=1e-9)
    assert res.layers == [0, 1, 2] and res.num_images == 9 and res.class_names == list(SHAPE_CLASSES)
    assert res.probe_chance == pytest.approx(1 / 3) and res.num_labelled_tokens > 0


def test_default_probe_brings_image_classes_and_plain_probes_skip_labels():
    model, processor = tiny_model("qwen2_vl"), tiny_processor("qwen2_vl")
    res = visual_degradation(model, processor, default_probe(9), num_samples=None, folds=3, progress=False)
    assert res.class_names == ["document", "chart", "scene"] and res.num_classes == 3
    assert res.contrast_ratio is None and res.probe_accuracy is not None
    plain = Probe.from_pairs([(Image.new("RGB", (32, 32), (i * 20, 0, 0)), "text") for i in range(4)])
    res = visual_degradation(model, processor, plain, progress=False)
    assert res.probe_accuracy is None and res.contrast_ratio is None and len(res.effective_dim) == 3
    explicit = visual_degradation(model, processor, plain, image_labels=[0, 1, 0, 1], folds=2, progress=False)
    assert explicit.num_classes == 2


def test_unknown_token_layout_skips_contrast_with_a_warning():
    model, processor = tiny_model("llava"), tiny_processor("llava")
    with pytest.warns(UserWarning, match="token_grid"):
        res = visual_degradation(model, processor, shapes_probe(4), folds=2, token_grid=lambda n: None,
                                 progress=False)  # fmt: skip
    assert res.contrast_ratio is None and res.probe_accuracy is not None


def test_errors_and_json_round_trip():
    model, processor = tiny_model("llava"), tiny_processor("llava")
    with pytest.raises(ValueError, match="out of range"):
        visual_degradation(model, processor, shapes_probe(3), layers=[4], progress=False)
    with pytest.raises(ValueError, match="at least 2 images"):
        visual_degradation(model, processor, shapes_probe(1), progress=False)
    with pytest.raises(ValueError, match="folds"):
        visual_degradation(model, processor, shapes_probe(3), folds=5, progress=False)
    with pytest.raises(ValueError, match="too few labelled vision tokens"):  # one token per image: no pairs
        visual_degradation(model, processor, shapes_probe(3), folds=2, token_grid=lambda n: (0, 1, 1), progress=False)
    with pytest.raises(ValueError, match="entries for"):
        LabelledProbe(shapes_probe(3).probe, image_labels=[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = degradation_from_features([torch.randn(12, 4)], torch.arange(12) // 3, patch_labels=[0, 0, 1] * 4)
    back = DegradationResult.from_dict(r.to_dict())
    assert back.effective_dim == r.effective_dim and back.probe_accuracy is None
