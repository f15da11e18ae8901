"""Input checks shared by the measures: any tensor or array as float64 [rows, dim] features."""

from __future__ import annotations

from typing import Any

import torch

from .frechet import to_f64

__all__ = ["as_features"]


def as_features(x: Any, what: str, *, min_rows: int = 1) -> torch.Tensor:
    """``x`` as a float64 [rows, dim] tensor on its own device; ValueError naming ``what`` otherwise.

    Example:
        >>> import numpy as np
        >>> as_features(np.ones((3, 2), dtype=np.float32), "x").dtype
        torch.float64
    """
    t = to_f64(x, what, None)
    if t.ndim != 2:
        raise ValueError(f"{what} must be 2-D [tokens, dim], got shape {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise ValueError(f"{what}: need at least {min_rows} tokens, got {t.shape[0]}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains non-finite values (NaN/inf)")
    return t
