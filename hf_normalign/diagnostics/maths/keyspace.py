"""MMD, shared-PCA histograms and their Jensen-Shannon divergence, t-SNE: the key-space gap measures on
plain feature tensors (the model-level metric and its choices: :mod:`..metrics.keyspace`).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    >>> abs(mmd2_rbf(x, y)) < 0.02          # same distribution
    True
    >>> mmd2_rbf(x, y + 2.0) > 0.3          # shifted
    True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .features import as_features

__all__ = [
    "MAX_CELLS",
    "auto_bins",
    "jsd_histograms",
    "jsd_pca",
    "median_bandwidth",
    "mmd2",
    "mmd2_both",
    "mmd2_rbf",
    "pca_basis",
    "pca_histograms",
    "random_halves",
    "subsample",
    "tsne_2d",
    "tsne_class",
]

_EXACT_PCA_MAX = 512  # exact eigh below this size; seeded randomized subspace iteration above


MAX_CELLS = 1_000_000  # histogram cells (bins ** dims)


def auto_bins(n: int, dims: int) -> int:
    """Bins per PCA axis for about 10 of ``n`` points per cell: clip(floor((n / 10)^(1/dims)), 2, 64).

    Example:
        >>> auto_bins(1000, 2), auto_bins(1000, 1), auto_bins(5, 2)
        (10, 64, 2)
    """
    return int(min(64, max(2, math.floor((max(n, 0) / 10) ** (1 / dims) + 1e-9))))


def subsample(x: Any, max_samples: int | None, seed: int = 0) -> torch.Tensor:
    """A seeded uniform subset of at most ``max_samples`` rows of ``x`` (original order kept), float64.

    Example:
        >>> import torch
        >>> subsample(torch.arange(10.0)[:, None], 3, seed=0).shape
        torch.Size([3, 1])
    """
    t = as_features(x, "features", min_rows=0)
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    if max_samples is None or t.shape[0] <= max_samples:
        return t
    perm = torch.randperm(t.shape[0], generator=torch.Generator().manual_seed(seed))
    return t[perm[:max_samples].sort().values.to(t.device)]


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ||a||^2 + ||b||^2 - 2 a.b in float64; clamped because rounding can make it slightly negative.
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def median_bandwidth(x: Any, y: Any | None = None) -> float:
    """Median-heuristic RBF bandwidth: the median pairwise Euclidean distance of the pooled rows.

    Over the distinct pairs (i < j) of ``x`` stacked on ``y``; the average of the two middle values
    for an even count. Falls back to the mean distance when the median is 0 (many repeated rows),
    and to 1.0 when all rows coincide.

    Example:
        >>> import torch
        >>> median_bandwidth(torch.tensor([[0.0], [1.0], [3.0]]))
        2.0
    """
    z = as_features(x, "x", min_rows=1)
    if y is not None:
        z = torch.cat([z, as_features(y, "y", min_rows=1).to(z.device)])
    if z.shape[0] < 2:
        raise ValueError("the median heuristic needs at least 2 points")
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    dist = _sq_dists(z, z)[iu[0], iu[1]].sqrt()
    h = float(np.median(dist.cpu().numpy()))
    if h <= 0:
        h = float(dist.mean())
    return h if h > 0 else 1.0


def mmd2(x: torch.Tensor, y: torch.Tensor, h: float, unbiased: bool) -> float:
    """MMD^2 of float64 rows ``x``, ``y`` with RBF bandwidth ``h``: the U-statistic or the V-statistic."""
    return mmd2_both(x, y, h)[0 if unbiased else 1]


def mmd2_both(x: torch.Tensor, y: torch.Tensor, h: float) -> tuple[float, float]:
    """(unbiased U-statistic, biased V-statistic) of MMD^2 from one set of kernel matrices."""
    gamma = 1.0 / (2.0 * h * h)
    kxx = torch.exp(-gamma * _sq_dists(x, x))
    kyy = torch.exp(-gamma * _sq_dists(y, y))
    kxy = torch.exp(-gamma * _sq_dists(x, y))
    n, m = x.shape[0], y.shape[0]
    cross = 2.0 * kxy.mean()
    # The exact diagonal is exp(0) = 1; the U-statistic leaves it out.
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - cross), float(kxx.mean() + kyy.mean() - cross)


def mmd2_rbf(
    x: Any,
    y: Any,
    *,
    bandwidth: float | None = None,
    unbiased: bool = True,
    max_samples: int | None = 2000,
    seed: int = 0,
) -> float:
    """Squared maximum mean discrepancy of ``x`` [n, d] and ``y`` [m, d] with a Gaussian RBF kernel.

    k(a, b) = exp(-||a - b||^2 / (2 h^2)). Unbiased (default):

        MMD^2_u = sum_{i != j} k(x_i, x_j) / (n (n-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
                  - 2 sum_{i, j} k(x_i, y_j) / (n m)

    ``unbiased=False`` keeps the diagonal terms (divides by n^2, m^2). Computed in float64.

    Args:
        bandwidth: h; None = :func:`median_bandwidth` of the pooled (subsampled) rows.
        max_samples: at most this many rows per set, a seeded uniform subset (``seed`` for x,
            ``seed + 1`` for y); None = all rows (memory grows as (n + m)^2).

    Example:
        >>> import torch
        >>> x = torch.zeros(4, 2)
        >>> mmd2_rbf(x, x + 1.0, bandwidth=1.0)  # 1 + 1 - 2 exp(-1)
        1.2642411176571153
    """
    xs = subsample(x, max_samples, seed)
    ys = subsample(y, max_samples, seed + 1).to(xs.device)
    minimum = 2 if unbiased else 1
    for name, t in (("x", xs), ("y", ys)):
        if t.shape[0] < minimum:
            raise ValueError(f"mmd2_rbf: {name} needs at least {minimum} rows, got {t.shape[0]}")
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(f"mmd2_rbf: x has {xs.shape[1]} dims, y has {ys.shape[1]}")
    h = median_bandwidth(xs, ys) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    return mmd2(xs, ys, h, unbiased)


def _fix_signs(components: torch.Tensor) -> torch.Tensor:
    # Eigenvectors have no sign; make each one's largest-magnitude loading positive (deterministic).
    idx = components.abs().argmax(dim=1)
    signs = torch.sign(components.gather(1, idx[:, None]))
    return components * torch.where(signs == 0, 1.0, signs)


def pca_basis(x: Any, y: Any, dims: int = 2, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared PCA of two sets, weighted equally: (mean [d], components [dims, d], variances [dims]).

    The mean is (mean(x) + mean(y)) / 2 and the covariance that of the 50/50 mixture of the two
    sets, so the larger set does not choose the axes. Exact (``eigh``) when min(rows, d) <= 512,
    else a seeded randomized subspace iteration (10 extra directions, 8 power iterations), which
    recovers the leading components to rounding unless their eigenvalues nearly tie. Each
    component's largest-magnitude loading is positive.

    Example:
        >>> import torch
        >>> mean, comps, var = pca_basis(torch.randn(50, 6), torch.randn(40, 6), dims=2)
        >>> tuple(comps.shape)
        (2, 6)
    """
    xs = as_features(x, "x", min_rows=1)
    ys = as_features(y, "y", min_rows=1).to(xs.device)
    d = xs.shape[1]
    if ys.shape[1] != d:
        raise ValueError(f"x has {d} dims, y has {ys.shape[1]}")
    if not 1 <= dims <= d:
        raise ValueError(f"dims must be in 1..{d}, got {dims}")
    mean = 0.5 * (xs.mean(0) + ys.mean(0))
    a = torch.cat([(xs - mean) / math.sqrt(2 * xs.shape[0]), (ys - mean) / math.sqrt(2 * ys.shape[0])])
    if min(a.shape) <= _EXACT_PCA_MAX:
        if a.shape[0] < d:  # eigenvectors of A^T A from those of the smaller A A^T
            evals, u = torch.linalg.eigh(a @ a.T)
            evals, u = evals.flip(0)[:dims], u.flip(1)[:, :dims]
            comps = (a.T @ u) / evals.clamp_min(1e-300).sqrt()
        else:
            evals, v = torch.linalg.eigh(a.T @ a)
            evals, comps = evals.flip(0)[:dims], v.flip(1)[:, :dims]
    else:
        k = min(dims + 10, min(a.shape))
        gen = torch.Generator(device=a.device).manual_seed(seed)
        q = torch.randn(d, k, generator=gen, device=a.device, dtype=a.dtype)
        for _ in range(8):
            q, _r = torch.linalg.qr(a.T @ (a @ q))
        _u, s, vh = torch.linalg.svd(a @ q, full_matrices=False)
        evals, comps = (s * s)[:dims], (q @ vh.T)[:, :dims]
    comps = comps / comps.norm(dim=0, keepdim=True).clamp_min(1e-300)
    return mean, _fix_signs(comps.T.contiguous()), evals.clamp_min(0.0)


def pca_histograms(
    x: Any,
    y: Any,
    *,
    dims: int = 2,
    bins: int | None = None,
    clip_quantile: float = 0.01,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Joint histograms (counts) of ``x`` and ``y`` on their shared PCA projection, and the bin edges.

    Each of the ``dims`` components is split into ``bins`` equal bins (None: :func:`auto_bins` of the
    smaller set) spanning the pooled projections between the ``clip_quantile`` and
    ``1 - clip_quantile`` quantiles (0 = min to max); points outside are counted in the edge bins.
    Returns (counts_x, counts_y, edges), counts shaped [bins] * dims.

    Example:
        >>> import torch
        >>> hx, hy, edges = pca_histograms(torch.randn(100, 5), torch.randn(80, 5), dims=2, bins=4)
        >>> hx.shape, int(hx.sum()), int(hy.sum())
        ((4, 4), 100, 80)
    """
    if not 0 <= clip_quantile < 0.5:
        raise ValueError(f"clip_quantile must be in [0, 0.5), got {clip_quantile}")
    xs, ys = as_features(x, "x"), as_features(y, "y")
    if bins is None:
        bins = auto_bins(min(xs.shape[0], ys.shape[0]), dims)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if bins**dims > MAX_CELLS:
        raise ValueError(f"bins ** dims = {bins}^{dims} cells is too many (max {MAX_CELLS}); lower bins or dims")
    mean, comps, _ = pca_basis(xs, ys, dims, seed=seed)
    px = ((xs - mean) @ comps.T).cpu().numpy()
    py = ((ys.to(mean.device) - mean) @ comps.T).cpu().numpy()
    pooled = np.concatenate([px, py])
    lo = np.quantile(pooled, clip_quantile, axis=0)
    hi = np.quantile(pooled, 1.0 - clip_quantile, axis=0)
    flat = hi <= lo  # a constant projection: one bin around it
    lo, hi = np.where(flat, lo - 0.5, lo), np.where(flat, hi + 0.5, hi)
    edges = [np.linspace(lo[i], hi[i], bins + 1) for i in range(dims)]
    hx, _ = np.histogramdd(np.clip(px, lo, hi), bins=edges)
    hy, _ = np.histogramdd(np.clip(py, lo, hi), bins=edges)
    return hx, hy, edges


def jsd_histograms(p: Any, q: Any, *, base: float = 2.0) -> float:
    """Jensen-Shannon divergence of two histograms (any shape; counts or probabilities).

    Both are normalised to sum 1; JSD = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2,
    0 log 0 = 0, logarithm in ``base`` (2: bits, JSD in [0, 1]; e: nats, in [0, ln 2]). Equals
    ``scipy.spatial.distance.jensenshannon(p, q, base=base) ** 2``.

    Example:
        >>> jsd_histograms([1, 0], [0, 1])
        1.0
    """
    a = np.asarray(p, dtype=np.float64).ravel()
    b = np.asarray(q, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"histograms differ in size: {a.size} vs {b.size}")
    if (a < 0).any() or (b < 0).any() or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("histograms must be finite and non-negative")
    if a.sum() <= 0 or b.sum() <= 0:
        raise ValueError("a histogram is empty (sums to 0)")
    if not base > 1:
        raise ValueError(f"base must be > 1, got {base}")
    a, b = a / a.sum(), b / b.sum()
    m = 0.5 * (a + b)

    def kl(u: np.ndarray) -> float:
        nz = u > 0
        return float(np.sum(u[nz] * np.log(u[nz] / m[nz])))

    return max(0.0, 0.5 * (kl(a) + kl(b)) / math.log(base))


def jsd_pca(
    x: Any,
    y: Any,
    *,
    dims: int = 2,
    bins: int | None = None,
    base: float = 2.0,
    clip_quantile: float = 0.01,
    max_samples: int | None = 2000,
    seed: int = 0,
) -> float:
    """JSD of ``x`` and ``y`` over histograms of their shared PCA projection (see the module docstring).

    Rows are capped at ``max_samples`` per set (seeded, as :func:`mmd2_rbf`).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> jsd_pca(torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g) + 5) > 0.9
        True
    """
    xs = subsample(x, max_samples, seed)
    ys = subsample(y, max_samples, seed + 1)
    hx, hy, _ = pca_histograms(xs, ys, dims=dims, bins=bins, clip_quantile=clip_quantile, seed=seed)
    return jsd_histograms(hx, hy, base=base)


def tsne_class() -> Any:
    """scikit-learn's ``TSNE``; ImportError naming the extra to install when it is missing."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as err:
        raise ImportError(
            "tsne=True needs scikit-learn, which hf-normalign does not install by default: "
            'pip install "hf-normalign[tsne]"'
        ) from err
    return TSNE


def tsne_2d(x: Any, *, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """2-D t-SNE of the rows of ``x`` [n, d] with scikit-learn: ``TSNE(n_components=2, perplexity, init="pca",
    random_state=seed)``, other settings scikit-learn's defaults (Barnes-Hut, 1000 iterations).

    ``perplexity`` None = min(30, (n - 1) / 3) (scikit-learn needs it below n). The same ``seed`` and
    rows give the same points. ImportError naming ``pip install "hf-normalign[tsne]"`` without scikit-learn.

    Example:
        >>> import torch
        >>> tsne_2d(torch.randn(40, 5), seed=0).shape  # doctest: +SKIP
        (40, 2)
    """
    tsne = tsne_class()
    rows = as_features(x, "x", min_rows=4).cpu().numpy()
    chosen = min(30.0, (rows.shape[0] - 1) / 3) if perplexity is None else float(perplexity)
    if not 0 < chosen < rows.shape[0]:
        raise ValueError(f"perplexity must be in (0, {rows.shape[0]}), got {perplexity}")
    return tsne(n_components=2, perplexity=chosen, init="pca", random_state=seed).fit_transform(rows)


def random_halves(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random halves of the rows of ``x`` (the intra-modal baseline); an odd row is left out."""
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    half = x.shape[0] // 2
    return x[perm[:half]], x[perm[half : 2 * half]]
