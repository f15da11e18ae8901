"""Visual degradation measures on plain feature tensors (the PRe paper's diagnostics, arXiv 2603.20808):
participation ratio, off-diagonal correlation, patch contrast, linear-probe accuracy, patch labels of a grid.
The model-level metric and its definitions: :mod:`..metrics.degradation`.

Example:
    >>> import torch
    >>> x = torch.randn(200, 3) * torch.tensor([10.0, 1.0, 1.0])  # one dominant direction
    >>> round(participation_ratio(x), 1) < 1.2
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .features import as_features

__all__ = [
    "ContrastStats",
    "DegradationOptions",
    "contrast_from_sums",
    "contrast_ratio",
    "contrast_sums",
    "linear_probe_accuracy",
    "mean_abs_offdiag_correlation",
    "mean_offdiag_correlation",
    "participation_ratio",
    "patch_labels_for_grid",
]


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


def contrast_sums(x: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, ignore_label: int) -> list[float]:
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


def contrast_from_sums(sums: Sequence[float]) -> ContrastStats:
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
    return contrast_from_sums(contrast_sums(x, labels, g.reshape(-1), ignore_label))


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


@dataclass(frozen=True)
class DegradationOptions:
    """The choices behind the degradation numbers, validated on construction: linear-probe folds, ridge and
    seed (:func:`linear_probe_accuracy`), the correlation axis, the share of a token's
    cell an object must cover to label the token, the layers (hidden-state numbers 0..K; default all, 0
    included), layer K before (``final_norm=False``, default) or after the final norm, and ``token_grid``
    (:func:`~..metrics.degradation.visual_degradation`).

    Example:
        >>> DegradationOptions(folds=1)
        Traceback (most recent call last):
        ...
        ValueError: folds must be >= 2, got 1
    """

    folds: int = 5
    ridge: float = 0.1
    corr_axis: str = "features"
    seed: int = 0
    min_coverage: float = 1 / 3
    layers: tuple[int, ...] | None = None
    final_norm: bool = False
    token_grid: Callable[[int], tuple[int, int, int] | None] | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if not self.ridge > 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")
        if self.corr_axis not in ("features", "samples"):
            raise ValueError(f"corr_axis must be 'features' or 'samples', got {self.corr_axis!r}")
        if not 0 < self.min_coverage <= 1:
            raise ValueError(f"min_coverage must be in (0, 1], got {self.min_coverage}")

    def settings(self) -> dict[str, Any]:
        """How the numbers were computed, for ``DegradationResult.settings``."""
        return {
            "pooling": "mean over the vision tokens of each image",
            "effective_dim": "participation ratio (sum lambda)^2 / sum lambda^2 of the pooled-feature covariance",
            "corr_axis": self.corr_axis,
            "contrast_ratio": "cohesion / coupling (the paper's); cosine pairs within one image; -1 labels ignored",
            "contrast_ratio_shifted": "(1 + cohesion) / (1 + coupling)",
            "offdiag_corr": "mean |r| off the diagonal; offdiag_corr_signed: mean r",
            "linear_probe": f"ridge (closed form) on standardised pooled features, {self.folds}-fold stratified CV",
            "folds": self.folds,
            "ridge": self.ridge,
            "seed": self.seed,
        }
