"""Visual representation degradation across LLM depth (the PRe paper's diagnostics, arXiv 2603.20808).

Per hidden state l (0 = LLM input, k = output of decoder layer k), on the vision tokens:

- **effective dimension** of the mean-pooled vision features (one vector per image): the
  participation ratio PR = (sum_i lambda_i)^2 / sum_i lambda_i^2 of the eigenvalues of their
  covariance, :func:`participation_ratio`. PR is 1 when one direction holds all the variance and d
  when all d directions hold equal variance; it is at most min(images - 1, d).
- **mean off-diagonal correlation** of the pooled features: the Pearson correlation between every
  two feature dimensions across images (``axis="features"``, default) or between every two images
  across dimensions (``axis="samples"``), averaged off the diagonal, both as the mean |r|
  (:func:`mean_abs_offdiag_correlation`) and signed (:func:`mean_offdiag_correlation`); the paper's
  text does not say which it plots. High values mean redundant, collapsed features.
- **patch contrast ratio** when patch labels are given, :func:`contrast_ratio`: cohesion = mean cosine
  of two vision tokens of the same object in the same image, coupling = mean cosine of two tokens
  of different objects in the same image; ``ratio`` = cohesion / coupling, the paper's definition
  (undefined when coupling is 0 and meaningless when it is negative: read cohesion and coupling then).
  ``ratio_shifted`` = (1 + cohesion) / (1 + coupling), the ratio of the mean shifted similarities
  (1 + cos) / 2 in [0, 1], is ours: defined for any cosines, 1 means no contrast. The two can move in
  opposite directions (0.5 / 0.2 -> 0.9 / 0.5: the paper's ratio falls, the shifted one rises), so
  compare with the paper only through ``ratio``.
- **linear-probe accuracy** when image labels are given, :func:`linear_probe_accuracy`: ridge
  regression on one-hot labels (closed form, standardised features), k-fold cross-validated.

The default probe (:func:`shapes_probe`) draws images of two to four shapes of one kind
(rectangles, ellipses or triangles: the image label) on a textured background, with a pixel map of
which object each pixel belongs to (the patch labels). The built-in ``default_probe`` supplies image
labels (document / chart / scene) through its sample names, but no patch labels.

Example:
    >>> import torch
    >>> x = torch.randn(200, 3) * torch.tensor([10.0, 1.0, 1.0])  # one dominant direction
    >>> round(participation_ratio(x), 1) < 1.2
    True
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from .probe import Probe, ProbeSample, default_passages, sample_indices
from .profile import as_features, encoded_probe, json_floats

__all__ = [
    "SHAPE_CLASSES",
    "ContrastStats",
    "DegradationResult",
    "LabelledProbe",
    "contrast_ratio",
    "degradation_from_features",
    "linear_probe_accuracy",
    "mean_abs_offdiag_correlation",
    "mean_offdiag_correlation",
    "participation_ratio",
    "patch_labels_for_grid",
    "shapes_probe",
    "visual_degradation",
]

SHAPE_CLASSES: tuple[str, ...] = ("rectangle", "ellipse", "triangle")
_DEFAULT_KINDS = ("document", "chart", "scene")  # image classes of the built-in default_probe


# ----------------------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------------------


def participation_ratio(features: Any) -> float:
    """PCA effective dimension of ``features`` [n, d]: (sum lambda)^2 / sum lambda^2, float64.

    lambda are the eigenvalues of the covariance of the rows (centred); computed as
    tr(C)^2 / ||C||_F^2 on the smaller of the d x d covariance and the n x n Gram matrix (same
    non-zero eigenvalues), so no eigendecomposition is needed.

    Example:
        >>> import torch
        >>> round(participation_ratio(torch.eye(4)), 6)  # 4 points, 3 equal variance directions
        3.0
    """
    x = as_features(features, "features", min_rows=2)
    xc = x - x.mean(0)
    m = xc @ xc.T if xc.shape[0] < xc.shape[1] else xc.T @ xc
    total = float(m.diagonal().sum())
    if total <= 0:
        raise ValueError("participation_ratio: the features have no variance")
    return total**2 / float((m * m).sum())


def mean_abs_offdiag_correlation(features: Any, *, axis: str = "features", chunk: int = 1024) -> float:
    """Mean |Pearson r| over the off-diagonal of a correlation matrix of ``features`` [n, d].

    See :func:`mean_offdiag_correlation` for the signed mean.

    ``axis="features"``: correlations between the d columns across the n rows (``np.corrcoef(x.T)``);
    ``axis="samples"``: between the n rows across the d columns (``np.corrcoef(x)``). Variables with
    zero variance have no correlation and are left out. Float64, in chunks of ``chunk`` rows of
    the matrix.

    Example:
        >>> import torch
        >>> mean_abs_offdiag_correlation(torch.tensor([[1.0, 2.0], [2.0, 4.1], [3.0, 6.0]]))  # doctest: +ELLIPSIS
        0.99...
    """
    return _offdiag_correlation(features, axis, chunk, absolute=True)


def mean_offdiag_correlation(features: Any, *, axis: str = "features", chunk: int = 1024) -> float:
    """Signed mean Pearson r over the off-diagonal of a correlation matrix of ``features`` [n, d].

    Same variables and rules as :func:`mean_abs_offdiag_correlation`; positive and negative
    correlations cancel here, so it is near 0 for independent features and for anti-correlated pairs.

    Example:
        >>> import torch
        >>> mean_offdiag_correlation(torch.tensor([[1.0, -2.0], [2.0, -4.1], [3.0, -6.0]]))  # doctest: +ELLIPSIS
        -0.99...
    """
    return _offdiag_correlation(features, axis, chunk, absolute=False)


def _offdiag_correlation(features: Any, axis: str, chunk: int, absolute: bool) -> float:
    if axis not in ("features", "samples"):
        raise ValueError(f"axis must be 'features' or 'samples', got {axis!r}")
    x = as_features(features, "features", min_rows=1)
    v = x if axis == "features" else x.T  # columns are the variables
    if v.shape[0] < 2:
        raise ValueError(f"mean_abs_offdiag_correlation: need at least 2 observations, got {v.shape[0]}")
    vc = v - v.mean(0)
    norms = vc.norm(dim=0)
    keep = norms > 1e-12 * norms.max().clamp_min(1e-300)
    z = vc[:, keep] / norms[keep]
    p = z.shape[1]
    if p < 2:
        raise ValueError("mean_abs_offdiag_correlation: fewer than 2 variables with non-zero variance")
    total = 0.0
    for start in range(0, p, chunk):
        block = z[:, start : start + chunk].T @ z
        block = block.abs() if absolute else block
        total += float(block.sum()) - float(block.diagonal(offset=start).sum())
    return total / (p * (p - 1))


@dataclass(frozen=True)
class ContrastStats:
    """Cohesion (same-object mean cosine), coupling (different-object mean cosine), the paper's contrast
    ratio cohesion / coupling, our shifted ratio (1 + cohesion) / (1 + coupling), and the number of
    token pairs behind each."""

    cohesion: float
    coupling: float
    ratio: float
    same_pairs: int
    different_pairs: int
    ratio_shifted: float


def _contrast_sums(x: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, ignore_label: int) -> list[float]:
    """[sum same cos, same pairs, sum different cos, different pairs] over unordered pairs within groups."""
    keep = labels != ignore_label
    x, labels, groups = x[keep], labels[keep], groups[keep]
    out = [0.0, 0.0, 0.0, 0.0]
    u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    for g in groups.unique():
        sel = groups == g
        ug, lg = u[sel], labels[sel]
        cos = ug @ ug.T
        same = lg[:, None] == lg[None, :]
        off = ~torch.eye(lg.shape[0], dtype=torch.bool, device=lg.device)
        # Each unordered pair appears twice in the full matrix: halve sums and counts.
        out[0] += 0.5 * float(cos[same & off].sum())
        out[1] += 0.5 * float((same & off).sum())
        out[2] += 0.5 * float(cos[~same].sum())
        out[3] += 0.5 * float((~same).sum())
    return out


def _contrast_from_sums(sums: Sequence[float]) -> ContrastStats:
    same_sum, same_n, diff_sum, diff_n = sums
    if same_n == 0 or diff_n == 0:
        raise ValueError(
            "contrast_ratio needs pairs of tokens of the same object and of different objects within one image "
            f"(got {int(same_n)} same-object and {int(diff_n)} different-object pairs): too few labelled vision tokens"
        )
    cohesion, coupling = same_sum / same_n, diff_sum / diff_n
    ratio = cohesion / coupling if coupling != 0 else math.copysign(math.inf, cohesion)
    shifted = (1.0 + cohesion) / (1.0 + coupling) if 1.0 + coupling > 1e-12 else math.inf
    return ContrastStats(cohesion, coupling, ratio, int(same_n), int(diff_n), shifted)


def contrast_ratio(features: Any, patch_labels: Any, *, groups: Any = None, ignore_label: int = -1) -> ContrastStats:
    """Patch cohesion / coupling contrast of vision tokens ``features`` [n, d] with object ``patch_labels`` [n].

    Pairs are formed only within one image (``groups`` [n]: image id of each token; default: all one
    image). cohesion = mean cos over pairs with the same label, coupling = mean cos over pairs with
    different labels (each unordered pair once); ``ratio`` = cohesion / coupling (the paper's),
    ``ratio_shifted`` = (1 + cohesion) / (1 + coupling) (module docstring). Tokens
    labelled ``ignore_label`` (background, mixed patches) take no part. Raises ValueError when there
    is no pair of either kind.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
        >>> s = contrast_ratio(x, [0, 0, 1, 1])
        >>> s.cohesion > 0.99, s.coupling < 0.2, s.ratio > 5, s.ratio_shifted > 1.5
        (True, True, True, True)
    """
    x = as_features(features, "features", min_rows=1)
    labels = torch.as_tensor(np.asarray(patch_labels), device=x.device).long().reshape(-1)
    g = torch.zeros_like(labels) if groups is None else torch.as_tensor(np.asarray(groups), device=x.device).long()
    if labels.shape[0] != x.shape[0] or g.reshape(-1).shape[0] != x.shape[0]:
        raise ValueError(f"patch_labels / groups need one entry per token ({x.shape[0]})")
    return _contrast_from_sums(_contrast_sums(x, labels, g.reshape(-1), ignore_label))


def _stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fold = np.empty(y.shape[0], dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (np.arange(idx.size) + offset) % folds  # continue the round-robin: balanced folds
        offset += idx.size
    return fold


def linear_probe_accuracy(features: Any, labels: Any, *, folds: int = 5, seed: int = 0, ridge: float = 0.1) -> float:
    """k-fold cross-validated accuracy of a linear classifier on ``features`` [n, d] for ``labels`` [n].

    Per fold: features standardised with the training fold's mean and std, then ridge regression on
    one-hot targets, W = argmin ||X W + b - Y||^2 + ridge * d * ||W||^2, solved in closed form through
    the n x n kernel (X X^T / d + ridge I) A = Y - mean(Y); the class with the largest score wins.
    Folds are stratified (each class dealt round-robin after a seeded shuffle). Returns the fraction
    of all n held-out predictions that are right. Float64, torch, no sklearn.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(60) % 3
        >>> x = torch.randn(60, 10, generator=g) + 3 * torch.nn.functional.one_hot(y, 10)
        >>> linear_probe_accuracy(x, y) > 0.9
        True
    """
    x = as_features(features, "features", min_rows=1)
    y_raw = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if y_raw.shape[0] != x.shape[0]:
        raise ValueError(f"got {y_raw.shape[0]} labels for {x.shape[0]} feature rows")
    classes, y = np.unique(y_raw, return_inverse=True)
    if classes.size < 2:
        raise ValueError("linear_probe_accuracy needs at least 2 classes")
    if folds < 2 or folds > x.shape[0]:
        raise ValueError(f"folds must be in 2..{x.shape[0]} (number of samples), got {folds}")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    fold = _stratified_folds(y, folds, seed)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(y), classes.size).to(x)
    d = x.shape[1]
    correct = 0
    for f in range(folds):
        test = torch.as_tensor(fold == f, device=x.device)
        if not bool(test.any()):
            continue
        xtr, xte = x[~test], x[test]
        mu, sd = xtr.mean(0), xtr.std(0, correction=0)
        sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))  # constant dims carry nothing; avoid 0 / 0
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
        ytr = onehot[~test]
        ybar = ytr.mean(0)
        kernel = xtr @ xtr.T / d + ridge * torch.eye(xtr.shape[0], dtype=x.dtype, device=x.device)
        alpha = torch.linalg.solve(kernel, ytr - ybar)
        scores = (xte @ xtr.T / d) @ alpha + ybar
        correct += int((scores.argmax(1).cpu().numpy() == y[fold == f]).sum())
    return correct / x.shape[0]


# ----------------------------------------------------------------------------------------------------------
# Patch labels from label maps
# ----------------------------------------------------------------------------------------------------------


def patch_labels_for_grid(label_map: Any, rows: int, cols: int, *, min_coverage: float = 1 / 3) -> np.ndarray:
    """Object label of each cell of a ``rows`` x ``cols`` grid laid over ``label_map`` [H, W], row-major.

    A cell takes the label of the object covering most of its pixels if that object covers at least
    ``min_coverage`` of the cell; otherwise -1 (background, or a mixed cell). Pixels labelled < 0 are
    background.

    Example:
        >>> import numpy as np
        >>> m = -np.ones((4, 4), int); m[:, :2] = 0; m[:2, 2:] = 1
        >>> patch_labels_for_grid(m, 2, 2).tolist()
        [0, 1, 0, -1]
    """
    m = np.asarray(label_map)
    if m.ndim != 2:
        raise ValueError(f"label_map must be 2-D [H, W], got shape {m.shape}")
    h, w = m.shape
    ys = np.linspace(0, h, rows + 1).round().astype(int)
    xs = np.linspace(0, w, cols + 1).round().astype(int)
    out = np.full(rows * cols, -1, dtype=np.int64)
    for r in range(rows):
        for c in range(cols):
            cell = m[ys[r] : ys[r + 1], xs[c] : xs[c + 1]].ravel()
            objects = cell[cell >= 0]
            if cell.size == 0 or objects.size == 0:
                continue
            values, counts = np.unique(objects, return_counts=True)
            best = counts.argmax()
            if counts[best] >= min_coverage * cell.size:
                out[r * cols + c] = values[best]
    return out


def _token_grid(model: nn.Module, n_tokens: int) -> tuple[int, int, int] | None:
    """(first token, rows, cols) of the row-major grid of vision tokens covering the whole image.

    LLaVA-NeXT / OneVision put the overview tile (image_size / patch_size squared tokens) first.
    Otherwise a square count is a square grid (LLaVA, Qwen-VL on square images, InternVL, Gemma3,
    PaliGemma, Idefics3 / SmolVLM without image splitting, Mistral3); anything else is unknown.
    Checked on every tiny family by perturbing one image quadrant (tests/test_degradation.py).
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in ("llava_next", "llava_onevision"):
        # Overview tile first, then the high-res tiles (the total may happen to be square as well).
        vision = config.vision_config
        base = int(vision.image_size) // int(vision.patch_size)
        return (0, base, base) if base * base <= n_tokens else None
    side = math.isqrt(n_tokens)
    return (0, side, side) if side * side == n_tokens else None


# ----------------------------------------------------------------------------------------------------------
# The labelled probe
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LabelledProbe:
    """A :class:`~.probe.Probe` with image labels and / or per-pixel object maps (-1 = background).

    Example:
        >>> lp = shapes_probe(6)
        >>> len(lp), lp.class_names[lp.image_labels[0]], lp.label_maps[0].shape
        (6, 'rectangle', (336, 336))
    """

    probe: Probe
    image_labels: list[int] | None = None
    class_names: list[str] | None = None
    label_maps: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        for name in ("image_labels", "label_maps"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.probe):
                raise ValueError(f"{name} has {len(value)} entries for {len(self.probe)} probe pairs")

    def __len__(self) -> int:
        return len(self.probe)


def _draw_shapes(index: int, seed: int, size: int) -> tuple[Image.Image, np.ndarray, int]:
    rng = np.random.default_rng([seed, index, 7])
    kind = index % len(SHAPE_CLASSES)
    # Background: a smooth two-colour gradient in a random direction, plus fine noise.
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    theta = rng.uniform(0, 2 * np.pi)
    t = np.cos(theta) * xx + np.sin(theta) * yy
    t = (t - t.min()) / (t.max() - t.min())
    bg = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    label = Image.new("I", (size, size), -1)
    draw, ldraw = ImageDraw.Draw(img), ImageDraw.Draw(label)
    h = size // 2
    layouts = {  # regions (x0, y0, x1, y1) of the objects: halves and quadrants
        2: [[(0, 0, h, size), (h, 0, size, size)], [(0, 0, size, h), (0, h, size, size)]],
        3: [
            [(0, 0, h, size), (h, 0, size, h), (h, h, size, size)],
            [(0, 0, size, h), (0, h, h, size), (h, h, size, size)],
        ],
        4: [[(0, 0, h, h), (h, 0, size, h), (0, h, h, size), (h, h, size, size)]],
    }
    options = layouts[int(rng.integers(2, 5))]
    regions = options[int(rng.integers(len(options)))]
    for obj, (x0, y0, x1, y1) in enumerate(regions):
        mx, my = int((x1 - x0) * rng.uniform(0.04, 0.1)), int((y1 - y0) * rng.uniform(0.04, 0.1))
        box = (x0 + mx, y0 + my, x1 - mx - 1, y1 - my - 1)
        color = tuple(int(c) for c in (255 - bg[(y0 + y1) // 2, (x0 + x1) // 2] + rng.integers(-40, 40, 3)) % 256)
        for target, fill in ((draw, color), (ldraw, obj)):
            if kind == 0:
                target.rectangle(box, fill=fill)
            elif kind == 1:
                target.ellipse(box, fill=fill)
            else:
                target.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 6.0, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), np.asarray(label, dtype=np.int64), kind


@dataclass(frozen=True)
class _ShapesImage:
    """Lazily drawn image of the shapes probe (a picklable callable, as the default probe's)."""

    index: int
    seed: int
    size: int

    def __call__(self) -> Image.Image:
        return _draw_shapes(self.index, self.seed, self.size)[0]


def shapes_probe(num_samples: int = 60, seed: int = 0, *, image_size: int = 336) -> LabelledProbe:
    """A labelled probe of procedurally drawn images: two to four shapes of one kind per image.

    Image i holds rectangles, ellipses or triangles (i mod 3; the image label, class names in
    :data:`SHAPE_CLASSES`), one per half or quadrant of the image, each in its own colour, on a
    gradient background with mild noise. ``label_maps[i]`` [image_size, image_size] holds the object
    index of each pixel (-1 = background). Images are square, so processors that resize or
    centre-crop to a square see the whole image and the maps stay aligned. Passages are the
    built-in ones (the text does not enter the degradation metrics). Deterministic in ``seed``.

    Example:
        >>> sorted(set(shapes_probe(9).image_labels))
        [0, 1, 2]
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    passages = default_passages()
    samples, labels, maps = [], [], []
    for i in range(num_samples):
        _, label_map, kind = _draw_shapes(i, seed, image_size)
        samples.append(
            ProbeSample(
                _ShapesImage(i, seed, image_size), passages[i % len(passages)], f"shapes/{i:03d}-{SHAPE_CLASSES[kind]}"
            )
        )
        labels.append(kind)
        maps.append(label_map)
    return LabelledProbe(Probe(samples, name=f"shapes (seed {seed})"), labels, list(SHAPE_CLASSES), maps)


def _labels_from_names(probe: Any) -> tuple[list[int], list[str]] | None:
    """Image classes of the built-in default probe, read from its sample names ("default/007-chart")."""
    names = [getattr(s, "name", "") for s in probe]
    kinds = [re.search(r"^default/\d+-(\w+)$", n) for n in names]
    if not names or not all(k and k.group(1) in _DEFAULT_KINDS for k in kinds):
        return None
    return [_DEFAULT_KINDS.index(k.group(1)) for k in kinds], list(_DEFAULT_KINDS)


# ----------------------------------------------------------------------------------------------------------
# Result and accumulation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DegradationResult:
    """Per-layer degradation metrics of the vision tokens.

    Attributes:
        layers: hidden-state numbers (0 = LLM input, k = output of decoder layer k).
        effective_dim: participation ratio of the mean-pooled vision features (one row per image).
        offdiag_corr: mean |r| off the diagonal of their correlation matrix (``settings["corr_axis"]``).
        offdiag_corr_signed: the signed mean r off the diagonal.
        cohesion / coupling / contrast_ratio: patch contrast, ratio = cohesion / coupling as the paper
            (None without patch labels).
        contrast_ratio_shifted: (1 + cohesion) / (1 + coupling) (None without patch labels).
        probe_accuracy: cross-validated linear-probe accuracy (None without image labels).
        probe_chance: share of the most frequent class (what a constant guess scores).
        num_images, num_classes, class_names: the probe behind the numbers.
        num_labelled_tokens: vision tokens with an object label (0 without patch labels).
        settings: how it was computed.

    Example:
        >>> import torch
        >>> feats = [torch.randn(40, 6)]
        >>> r = degradation_from_features(feats, torch.arange(40) // 4, image_labels=[i % 2 for i in range(10)],
        ...                               folds=2)
        >>> r.layers, r.contrast_ratio, 0 <= r.probe_accuracy[0] <= 1
        ([0], None, True)
    """

    layers: list[int]
    effective_dim: list[float]
    offdiag_corr: list[float]
    cohesion: list[float] | None
    coupling: list[float] | None
    contrast_ratio: list[float] | None
    probe_accuracy: list[float] | None
    probe_chance: float | None
    num_images: int
    num_classes: int | None
    class_names: list[str] | None
    num_labelled_tokens: int
    settings: dict[str, Any] = field(default_factory=dict)
    offdiag_corr_signed: list[float] = field(default_factory=list)
    contrast_ratio_shifted: list[float] | None = None

    _FLOAT_LISTS = (
        "effective_dim",
        "offdiag_corr",
        "offdiag_corr_signed",
        "cohesion",
        "coupling",
        "contrast_ratio",
        "contrast_ratio_shifted",
        "probe_accuracy",
    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (non-finite floats as strings); :meth:`from_dict` inverts it."""
        out = asdict(self)
        for key in self._FLOAT_LISTS:
            out[key] = json_floats(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DegradationResult:
        kwargs = dict(data)
        for key in cls._FLOAT_LISTS:
            if kwargs.get(key) is not None:
                kwargs[key] = [float(v) for v in kwargs[key]]
        return cls(**kwargs)

    def format_table(self) -> str:
        head = (
            f"{'layer':>5}  {'eff. dim':>8}  {'|corr|':>7}  {'corr':>7}  {'contrast':>8}  {'cohesion':>8}  "
            f"{'coupling':>8}  {'probe acc':>9}"
        )
        lines = [head, "-" * len(head)]
        for i, layer in enumerate(self.layers):
            lines.append(
                f"{layer:>5}  {self.effective_dim[i]:>8.3f}  {self.offdiag_corr[i]:>7.4f}  "
                f"{_cell(self.offdiag_corr_signed or None, i, '>7.4f')}  "
                f"{_cell(self.contrast_ratio, i, '>8.4f')}  {_cell(self.cohesion, i, '>8.4f')}  "
                f"{_cell(self.coupling, i, '>8.4f')}  {_cell(self.probe_accuracy, i, '>9.3f')}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        chance = f", probe chance {self.probe_chance:.3f}" if self.probe_chance is not None else ""
        return f"DegradationResult ({self.num_images} images{chance})\n{self.format_table()}"


def _cell(values: list[float] | None, i: int, fmt: str) -> str:
    return format(values[i], fmt) if values is not None else "-"


class _DegradationAccumulator:
    """Mean-pooled vision features per image and contrast sums per layer, fed batch by batch."""

    def __init__(self, layers: Sequence[int], ignore_label: int) -> None:
        self.layers = list(layers)
        self.ignore_label = ignore_label
        self.pooled: dict[int, list[torch.Tensor]] = {k: [] for k in self.layers}
        self.sums: dict[int, list[float]] = {k: [0.0] * 4 for k in self.layers}
        self.images: list[int] = []
        self.labelled = 0

    def update(self, feats: dict[int, Any], groups: torch.Tensor, patch_labels: torch.Tensor | None) -> None:
        groups = groups.reshape(-1).cpu()
        ids, inverse = groups.unique(sorted=True, return_inverse=True)
        counts = torch.bincount(inverse, minlength=ids.shape[0]).double()
        self.images += ids.tolist()
        if patch_labels is not None:
            self.labelled += int((patch_labels != self.ignore_label).sum())
        for k in self.layers:
            x = as_features(feats[k], f"vision features of layer {k}")
            inv = inverse.to(x.device)
            pooled = torch.zeros(ids.shape[0], x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inv, x)
            self.pooled[k].append((pooled / counts.to(x.device)[:, None]).cpu())
            if patch_labels is not None:
                s = _contrast_sums(x, patch_labels.to(x.device), groups.to(x.device), self.ignore_label)
                self.sums[k] = [a + b for a, b in zip(self.sums[k], s, strict=True)]

    def result(
        self,
        image_labels: Sequence[int] | None,
        class_names: list[str] | None,
        with_contrast: bool,
        opts: dict[str, Any],
        settings: dict[str, Any],
    ) -> DegradationResult:
        n = len(self.images)
        if n < 2:
            raise ValueError(f"the degradation metrics need at least 2 images with vision tokens, got {n}")
        labels = None
        if image_labels is not None:
            by_image = dict(enumerate(image_labels))
            labels = np.asarray([by_image[i] for i in self.images])
        eff, corr, signed, coh, cop, ratio, shifted, acc = [], [], [], [], [], [], [], []
        for k in self.layers:
            x = torch.cat(self.pooled[k])
            eff.append(participation_ratio(x))
            corr.append(mean_abs_offdiag_correlation(x, axis=opts["corr_axis"]))
            signed.append(mean_offdiag_correlation(x, axis=opts["corr_axis"]))
            if with_contrast:
                c = _contrast_from_sums(self.sums[k])
                coh.append(c.cohesion)
                cop.append(c.coupling)
                ratio.append(c.ratio)
                shifted.append(c.ratio_shifted)
            if labels is not None:
                acc.append(
                    linear_probe_accuracy(x, labels, folds=opts["folds"], seed=opts["seed"], ridge=opts["ridge"])
                )
        chance = None
        if labels is not None:
            chance = float(np.unique(labels, return_counts=True)[1].max() / labels.size)
        return DegradationResult(
            layers=self.layers,
            effective_dim=eff,
            offdiag_corr=corr,
            cohesion=coh if with_contrast else None,
            coupling=cop if with_contrast else None,
            contrast_ratio=ratio if with_contrast else None,
            probe_accuracy=acc if labels is not None else None,
            probe_chance=chance,
            num_images=n,
            num_classes=int(np.unique(labels).size) if labels is not None else None,
            class_names=class_names,
            num_labelled_tokens=self.labelled,
            settings=_settings(opts) | settings,
            offdiag_corr_signed=signed,
            contrast_ratio_shifted=shifted if with_contrast else None,
        )


def _settings(opts: dict[str, Any]) -> dict[str, Any]:
    return {
        "pooling": "mean over the vision tokens of each image",
        "effective_dim": "participation ratio (sum lambda)^2 / sum lambda^2 of the pooled-feature covariance",
        "corr_axis": opts["corr_axis"],
        "contrast_ratio": "cohesion / coupling (the paper's); cosine pairs within one image; -1 labels ignored",
        "contrast_ratio_shifted": "(1 + cohesion) / (1 + coupling)",
        "offdiag_corr": "mean |r| off the diagonal; offdiag_corr_signed: mean r",
        "linear_probe": f"ridge (closed form) on standardised pooled features, {opts['folds']}-fold stratified CV",
        "folds": opts["folds"],
        "ridge": opts["ridge"],
        "seed": opts["seed"],
    }


def _options(folds: int, ridge: float, corr_axis: str, seed: int) -> dict[str, Any]:
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    if corr_axis not in ("features", "samples"):
        raise ValueError(f"corr_axis must be 'features' or 'samples', got {corr_axis!r}")
    return {"folds": folds, "ridge": ridge, "corr_axis": corr_axis, "seed": seed}


def degradation_from_features(
    vision_layers: Sequence[Any],
    image_ids: Any,
    *,
    patch_labels: Any = None,
    image_labels: Sequence[int] | None = None,
    class_names: list[str] | None = None,
    layers: Sequence[int] | None = None,
    folds: int = 5,
    ridge: float = 0.1,
    corr_axis: str = "features",
    ignore_label: int = -1,
    seed: int = 0,
) -> DegradationResult:
    """Degradation metrics from vision-token features: ``vision_layers[j]`` [n_tokens, d] per layer.

    ``image_ids`` [n_tokens] says which image each token belongs to (0..num_images-1; pooling and
    contrast pairs follow it); ``patch_labels`` [n_tokens] gives object labels (-1 = none) for the
    contrast ratio; ``image_labels[i]`` is the class of image i for the linear probe. Either may be
    None, which skips that metric.

    Example:
        >>> import torch
        >>> r = degradation_from_features([torch.randn(12, 4)], torch.arange(12) // 3,
        ...                               patch_labels=torch.tensor([0, 0, 1] * 4))
        >>> r.contrast_ratio is not None, r.probe_accuracy
        (True, None)
    """
    if len(vision_layers) == 0:
        raise ValueError("no layers given")
    numbers = list(range(len(vision_layers))) if layers is None else [int(i) for i in layers]
    if len(numbers) != len(vision_layers):
        raise ValueError(f"layers must number the {len(vision_layers)} entries, got {numbers}")
    opts = _options(folds, ridge, corr_axis, seed)
    ids = torch.as_tensor(np.asarray(image_ids)).long().reshape(-1)
    labels = None if patch_labels is None else torch.as_tensor(np.asarray(patch_labels)).long().reshape(-1)
    acc = _DegradationAccumulator(numbers, ignore_label)
    acc.update(dict(zip(numbers, vision_layers, strict=True)), ids, labels)
    return acc.result(image_labels, class_names, labels is not None, opts, {})


# ----------------------------------------------------------------------------------------------------------
# Model level
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Labelled:
    """The pairs to encode and their labels, aligned (after the seeded subset)."""

    samples: list[Any]
    image_labels: list[int] | None
    class_names: list[str] | None
    label_maps: list[Any] | None
    name: str


def _resolve_labelled(
    probe: Any, image_labels: Sequence[int] | None, label_maps: Sequence[Any] | None, num_samples: int | None, seed: int
) -> _Labelled:
    """Samples and labels from the probe arguments (explicit labels win over the probe's own)."""
    class_names = None
    if probe is None:
        probe = shapes_probe(num_samples or 60, seed)
    if isinstance(probe, LabelledProbe):
        samples, name = list(probe.probe), probe.probe.name
        image_labels = probe.image_labels if image_labels is None else image_labels
        label_maps = probe.label_maps if label_maps is None else label_maps
        class_names = probe.class_names
    else:
        samples = list(probe.samples if isinstance(probe, Probe) else probe)
        name = getattr(probe, "name", None) or f"{len(samples)} pairs"
        named = _labels_from_names(samples) if image_labels is None else None
        if named is not None:
            image_labels, class_names = named
    for what, values in (("image_labels", image_labels), ("label_maps", label_maps)):
        if values is not None and len(values) != len(samples):
            raise ValueError(f"{what} has {len(values)} entries for {len(samples)} probe pairs")
    keep = sample_indices(len(samples), num_samples, seed)
    return _Labelled(
        [samples[i] for i in keep],
        None if image_labels is None else [image_labels[i] for i in keep],
        class_names,
        None if label_maps is None else [label_maps[i] for i in keep],
        name if len(keep) == len(samples) else f"{name}, {len(keep)} of {len(samples)} (seed {seed})",
    )


def visual_degradation(
    model: nn.Module,
    processor: Any,
    probe: Any = None,
    *,
    image_labels: Sequence[int] | None = None,
    label_maps: Sequence[Any] | None = None,
    num_samples: int | None = 60,
    seed: int = 0,
    layers: Iterable[int] | None = None,
    batch_size: int = 8,
    final_norm: bool = False,
    folds: int = 5,
    ridge: float = 0.1,
    corr_axis: str = "features",
    min_coverage: float = 1 / 3,
    token_grid: Callable[[int], tuple[int, int, int] | None] | None = None,
    device: str | torch.device | None = None,
    prompt: str | None = None,
    progress: bool = True,
) -> DegradationResult:
    """Visual degradation of ``model`` across depth (default probe: :func:`shapes_probe`, labelled).

    Args:
        model: a supported ``...ForConditionalGeneration`` model.
        processor: its processor.
        probe: None (the shapes probe), a :class:`LabelledProbe`, a :class:`~.probe.Probe` (the built-in
            ``default_probe`` brings its document / chart / scene classes), pairs or encoded samples.
        image_labels / label_maps: labels for a plain probe: a class per pair, and an [H, W] map of
            object ids per pair (-1 = background) over the image as the processor sees it (square images
            are safest: a centre crop would shift the map).
        num_samples, seed: pairs used (a seeded subset, labels kept aligned).
        layers: hidden-state numbers 0..K (default all, 0 = the LLM input).
        final_norm: False (default) takes layer K before the final norm, like the other layers.
        folds, ridge: linear probe (:func:`linear_probe_accuracy`).
        corr_axis: see :func:`mean_abs_offdiag_correlation`.
        min_coverage: share of a token's cell an object must cover to label the token.
        token_grid: maps the number of vision tokens of an image to (first token, rows, cols) of the
            row-major token grid covering the whole image; the default knows square grids and the
            LLaVA-NeXT / OneVision overview tile. Without a grid the contrast ratio is skipped (warning).
        device, prompt: passed to :func:`~.capture.capture`.
        progress: tqdm progress bars.

    Example:
        >>> from hf_normalign.testing import tiny_model, tiny_processor
        >>> r = visual_degradation(tiny_model("llava"), tiny_processor("llava"), num_samples=12, folds=3,
        ...                        progress=False)
        >>> r.layers, r.num_classes
        ([0, 1, 2], 3)
    """
    from .capture import capture, resolve_layers

    opts = _options(folds, ridge, corr_axis, seed)
    selected = resolve_layers(model, layers, include_embeddings=layers is None)
    data = _resolve_labelled(probe, image_labels, label_maps, num_samples, seed)
    samples = encoded_probe(processor, data.samples, None, seed, prompt, progress)
    grid_of = token_grid or (lambda n: _token_grid(model, n))
    acc = _DegradationAccumulator(selected, -1)
    with_contrast = data.label_maps is not None
    for batch in capture(
        model,
        processor,
        samples,
        layers=selected,
        final_norm=final_norm,
        batch_size=batch_size,
        device=device,
        progress=progress,
    ):
        patch = None
        if with_contrast:
            patch = _batch_patch_labels(batch.vision_sample, batch.vision_patch, data.label_maps, grid_of, min_coverage)
            if patch is None:
                with_contrast = False
                warnings.warn(
                    f"the layout of the vision tokens of {getattr(model.config, 'model_type', 'this model')} is "
                    "unknown (pass token_grid=...): the contrast ratio is skipped",
                    stacklevel=2,
                )
        acc.update(batch.vision, batch.vision_sample, patch)
    settings = {
        "final_norm": final_norm,
        "probe": data.name,
        "batch_size": batch_size,
        "min_coverage": min_coverage if with_contrast else None,
    }
    return acc.result(data.image_labels, data.class_names, with_contrast, opts, settings)


def _batch_patch_labels(
    sample: torch.Tensor,
    patch: torch.Tensor,
    maps: Sequence[Any],
    grid_of: Callable[[int], tuple[int, int, int] | None],
    min_coverage: float,
) -> torch.Tensor | None:
    """Object label of every vision row of a batch (-1 outside the grid), or None if a layout is unknown."""
    out = torch.full_like(patch, -1)
    for s in sample.unique().tolist():
        rows = (sample == s).nonzero().squeeze(1)
        grid = grid_of(int(rows.shape[0]))
        if grid is None:
            return None
        first, r, c = grid
        cells = torch.as_tensor(patch_labels_for_grid(maps[s], r, c, min_coverage=min_coverage))
        within = patch[rows] - first
        inside = (within >= 0) & (within < r * c)
        out[rows[inside]] = cells[within[inside]]
    return out
