"""Outlier rules on token L2 norms for MIR (:mod:`.mir`): the 3-sigma and IQR bounds and the two medians.

Example:
    >>> import torch
    >>> norms = torch.tensor([1.0, 1.1, 0.9, 1.0, 9.0], dtype=torch.float64)
    >>> outlier_mask(norms, outlier_bounds(norms, "iqr", 1.5, "torch")).tolist()
    [False, False, False, False, True]
"""

from __future__ import annotations

import torch

__all__ = ["median", "outlier_bounds", "outlier_mask"]


def median(x: torch.Tensor, stats: str, dim: int = 0) -> torch.Tensor:
    """Median along ``dim``: torch's (lower of the two middle values) or numpy's (their mean)."""
    if stats == "torch":
        return x.median(dim=dim).values
    s = x.sort(dim=dim).values
    n = s.shape[dim]
    lo, hi = s.narrow(dim, (n - 1) // 2, 1), s.narrow(dim, n // 2, 1)
    return (0.5 * (lo + hi)).squeeze(dim)


def outlier_bounds(norms: torch.Tensor, rule: str, threshold: float, stats: str) -> tuple[float, float]:
    """(low, high): token norms outside this closed interval are outliers.

    3-sigma rule: median -/+ threshold * std (ddof 1 for torch statistics, 0 for numpy);
    IQR rule: Q1 - threshold * IQR, Q3 + threshold * IQR with linearly interpolated quartiles
    (``torch.quantile`` and ``np.percentile`` agree on that).
    """
    if rule == "iqr":
        q1, q3 = (float(q) for q in torch.quantile(norms, torch.tensor([0.25, 0.75], dtype=norms.dtype)))
        return q1 - threshold * (q3 - q1), q3 + threshold * (q3 - q1)
    centre = float(median(norms, stats))
    width = threshold * float(norms.std(correction=1 if stats == "torch" else 0))
    return centre - width, centre + width


def outlier_mask(norms: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """True where a norm lies outside the closed interval ``bounds``."""
    low, high = bounds
    return (norms < low) | (norms > high)
