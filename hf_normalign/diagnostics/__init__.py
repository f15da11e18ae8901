"""Measurements of the modality gap: MIR, norm and update-rate profiles, key-space gap, visual degradation.

Example:
    >>> from hf_normalign import diagnostics
    >>> import torch
    >>> x, y = torch.randn(500, 16), torch.randn(400, 16) + 1
    >>> round(diagnostics.frechet_distance(x, y), 1)  # doctest: +SKIP
    16.0
"""

from .frechet import SQRT_METHODS, GaussianMoments, frechet_distance, frechet_from_moments, trace_sqrt_product
from .mir_math import OUTLIER_MODES, MIRResult, StreamingMIR, mir_from_features

__all__ = [
    "OUTLIER_MODES",
    "SQRT_METHODS",
    "GaussianMoments",
    "MIRResult",
    "StreamingMIR",
    "frechet_distance",
    "frechet_from_moments",
    "mir_from_features",
    "trace_sqrt_product",
]
