"""Measurements of the modality gap: MIR, norm and update-rate profiles, key-space gap, visual degradation.

Layout (dependencies point down the list):

- :mod:`.report`, :mod:`.plots`, :mod:`.html`: the HTML report and its figures;
- :mod:`.metrics`: one module per metric (result, typed options, accumulator, entry point);
- :mod:`.runner`: :func:`~.runner.run_probe`, the one way a metric runs over a probe (one process or several);
- :mod:`.engine`: the capture engine (hooks, batching); :mod:`.model_facts`: what is read off the model's spec;
- :mod:`.probes`: probe sets (built-in, shapes, loaders) and their encoding;
- :mod:`.maths`: the measures on plain tensors (no model code); :mod:`.results`: the result base class.

Example:
    >>> from hf_normalign import diagnostics
    >>> from hf_normalign.testing import tiny_model, tiny_processor
    >>> model, processor = tiny_model("llava"), tiny_processor("llava")
    >>> result = diagnostics.mir(model, processor, num_samples=8)     # built-in offline probe
    >>> profile = diagnostics.modality_profile(model, processor, num_samples=8)
    >>> diagnostics.build_report({"base": (model, processor)}, "report/")   # doctest: +SKIP
"""

from .engine import CaptureBatch, capture
from .maths.degradation import (
    contrast_ratio,
    linear_probe_accuracy,
    mean_abs_offdiag_correlation,
    mean_offdiag_correlation,
    participation_ratio,
)
from .maths.frechet import SQRT_METHODS, GaussianMoments, frechet_distance, frechet_from_moments, trace_sqrt_product
from .maths.keyspace import jsd_histograms, jsd_pca, pca_basis, pca_histograms
from .maths.mir import OUTLIER_MODES, MIRResult, StreamingMIR, mir_from_features
from .maths.mmd import median_bandwidth, mmd2_rbf
from .maths.norms import adjacent_cosine, norm_stats
from .metrics.degradation import DegradationResult, degradation_from_features, visual_degradation
from .metrics.keyspace import KeySpaceResult, key_space_from_features, key_space_gap
from .metrics.mir import mir
from .metrics.profile import ModalityProfile, modality_profile, profile_from_features
from .probes import (
    EncodedSample,
    LabelledProbe,
    Probe,
    ProbeSample,
    default_probe,
    load_probe,
    prepare_probe,
    probe_from_dataset,
    shapes_probe,
)
from .report import Report, build_report
from .results import Result
from .runner import Accumulator, RunOptions, run_probe

__all__ = [
    "OUTLIER_MODES",
    "SQRT_METHODS",
    "Accumulator",
    "CaptureBatch",
    "DegradationResult",
    "EncodedSample",
    "GaussianMoments",
    "KeySpaceResult",
    "LabelledProbe",
    "MIRResult",
    "ModalityProfile",
    "Probe",
    "ProbeSample",
    "Report",
    "Result",
    "RunOptions",
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
    "prepare_probe",
    "probe_from_dataset",
    "profile_from_features",
    "run_probe",
    "shapes_probe",
    "trace_sqrt_product",
    "visual_degradation",
]
