"""Maximum mean discrepancy with a Gaussian RBF kernel, its median-heuristic bandwidth, seeded subsets and halves.

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

from typing import Any

import numpy as np
import torch

from .features import as_features

__all__ = ["median_bandwidth", "mmd2", "mmd2_both", "mmd2_rbf", "random_halves", "subsample"]


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


def random_halves(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random halves of the rows of ``x`` (the intra-modal baseline); an odd row is left out."""
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    half = x.shape[0] // 2
    return x[perm[:half]], x[perm[half : 2 * half]]
