"""Measurements of the modality gap: MIR, norm and update-rate profiles, key-space gap, visual degradation.

Example:
    >>> from hf_normalign import diagnostics
    >>> from hf_normalign.testing import tiny_model, tiny_processor
    >>> model, processor = tiny_model("llava"), tiny_processor("llava")
    >>> result = diagnostics.mir(model, processor, num_samples=8)     # built-in offline probe
    >>> profile = diagnostics.modality_profile(model, processor, num_samples=8)
    >>> diagnostics.build_report({"base": (model, processor)}, "report/")   # doctest: +SKIP
"""

from .capture import CaptureBatch, capture
from .degradation import (
    DegradationResult,
    LabelledProbe,
    contrast_ratio,
    degradation_from_features,
    linear_probe_accuracy,
    mean_abs_offdiag_correlation,
    mean_offdiag_correlation,
    participation_ratio,
    shapes_probe,
    visual_degradation,
)
from .frechet import SQRT_METHODS, GaussianMoments, frechet_distance, frechet_from_moments, trace_sqrt_product
from .keyspace import (
    KeySpaceResult,
    jsd_histograms,
    jsd_pca,
    key_space_from_features,
    key_space_gap,
    median_bandwidth,
    mmd2_rbf,
    pca_basis,
    pca_histograms,
)
from .mir import mir
from .mir_math import OUTLIER_MODES, MIRResult, StreamingMIR, mir_from_features
from .probe import Probe, ProbeSample, default_probe, load_probe, probe_from_dataset
from .profile import ModalityProfile, adjacent_cosine, modality_profile, norm_stats, profile_from_features
from .report import Report, build_report

__all__ = [
    "OUTLIER_MODES",
    "SQRT_METHODS",
    "CaptureBatch",
    "DegradationResult",
    "GaussianMoments",
    "KeySpaceResult",
    "LabelledProbe",
    "MIRResult",
    "ModalityProfile",
    "Probe",
    "ProbeSample",
    "Report",
    "StreamingMIR",
    "adjacent_cosine",
    "build_report",
    "capture",
    "contrast_ratio",
    "default_probe",
    "degradation_from_features",
    "frechet_distance",
    "frechet_from_moments",
    "jsd_histograms",
    "jsd_pca",
    "key_space_from_features",
    "key_space_gap",
    "linear_probe_accuracy",
    "load_probe",
    "mean_abs_offdiag_correlation",
    "mean_offdiag_correlation",
    "median_bandwidth",
    "mir",
    "mir_from_features",
    "mmd2_rbf",
    "modality_profile",
    "norm_stats",
    "participation_ratio",
    "pca_basis",
    "pca_histograms",
    "probe_from_dataset",
    "profile_from_features",
    "shapes_probe",
    "trace_sqrt_product",
    "visual_degradation",
]
