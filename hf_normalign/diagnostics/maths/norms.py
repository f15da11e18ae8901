"""Per-token L2 norm statistics and adjacent-layer cosines (the Unseen-Bias measures), in float64."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .features import as_features

__all__ = ["adjacent_cosine", "norm_stats", "norm_summary", "token_cosines"]


def norm_summary(norms: torch.Tensor) -> dict[str, float]:
    """mean, std (ddof 1; NaN for one value), median, min, max and count of a 1-D tensor of norms."""
    return {
        "mean": float(norms.mean()),
        "std": float(norms.std(correction=1)) if norms.numel() > 1 else math.nan,
        "median": float(np.median(norms.cpu().numpy())),
        "min": float(norms.min()),
        "max": float(norms.max()),
        "count": int(norms.numel()),
    }


def norm_stats(features: Any) -> dict[str, float]:
    """Summary of the per-token L2 norms of ``features`` [tokens, dim], in float64.

    Returns ``mean``, ``std`` (sample standard deviation, ddof 1; NaN for a single token),
    ``median`` (the average of the two middle values for an even count), ``min``, ``max``, ``count``.

    Example:
        >>> import torch
        >>> norm_stats(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))["mean"]
        3.0
    """
    x = as_features(features, "features")
    return norm_summary(x.norm(dim=1))


def token_cosines(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-wise cosine of two [tokens, dim] tensors."""
    # Clamp each norm separately: a zero token then has cosine 0 with anything, not NaN.
    na = a.norm(dim=1).clamp_min(eps)
    nb = b.norm(dim=1).clamp_min(eps)
    return (a * b).sum(dim=1) / (na * nb)


def adjacent_cosine(h_l: Any, h_next: Any, *, eps: float = 1e-12) -> float:
    """Update-rate proxy: the mean over tokens i of cos(h_l[i], h_next[i]), in float64.

    ``h_l`` and ``h_next`` are [tokens, dim] with row i the same token at two adjacent layers. A
    token with zero norm contributes cosine 0.

    Example:
        >>> import torch
        >>> adjacent_cosine(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        0.5
    """
    a = as_features(h_l, "h_l")
    b = as_features(h_next, "h_next").to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"h_l {tuple(a.shape)} and h_next {tuple(b.shape)} must hold the same tokens")
    return float(token_cosines(a, b, eps).mean())
