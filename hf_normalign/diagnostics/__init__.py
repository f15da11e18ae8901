"""Measurements of the modality gap: MIR, norm and update-rate profiles, key-space gap, visual degradation.

Layout (dependencies point down the list):

- :mod:`.report`, :mod:`.plots`, :mod:`.html`: the HTML report and its figures;
- :mod:`.metrics`: one module per metric (result, typed options, accumulator, entry point);
- :mod:`.runner`: :func:`~.runner.run_probe`, the one way a metric runs over a probe (one process or several), and
  :func:`~.runner.run_metrics`, several metrics in one pass; :mod:`.options`: keywords forwarding to the options
  dataclasses (``MIROptions``, ``ProfileOptions``, ``KeySpaceOptions``, ``DegradationOptions``, ``RunOptions``);
- :mod:`.engine`: the capture engine (hooks, batching), on a :class:`~hf_normalign.model_view.ModelView`;
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
from .maths.keyspace import KeySpaceOptions, jsd_histograms, jsd_pca, pca_basis, pca_histograms
from .maths.mir import OUTLIER_MODES
from .maths.mmd import median_bandwidth, mmd2_rbf
from .maths.norms import adjacent_cosine, norm_stats
from .metrics.degradation import (
    DegradationOptions,
    DegradationResult,
    degradation_from_features,
    degradation_run,
    visual_degradation,
)
from .metrics.keyspace import KeySpaceResult, key_space_from_features, key_space_gap, key_space_run
from .metrics.mir import MIROptions, MIRResult, StreamingMIR, mir, mir_from_features, mir_run
from .metrics.profile import ModalityProfile, ProfileOptions, modality_profile, profile_from_features, profile_run
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
from .runner import Accumulator, MetricRun, RunOptions, run_metrics, run_probe

__all__ = [
    "OUTLIER_MODES",
    "SQRT_METHODS",
    "Accumulator",
    "CaptureBatch",
    "DegradationOptions",
    "DegradationResult",
    "EncodedSample",
    "GaussianMoments",
    "KeySpaceOptions",
    "KeySpaceResult",
    "LabelledProbe",
    "MIROptions",
    "MIRResult",
    "MetricRun",
    "ModalityProfile",
    "Probe",
    "ProbeSample",
    "ProfileOptions",
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
    "degradation_run",
    "frechet_distance",
    "frechet_from_moments",
    "jsd_histograms",
    "jsd_pca",
    "key_space_from_features",
    "key_space_gap",
    "key_space_run",
    "linear_probe_accuracy",
    "load_probe",
    "mean_abs_offdiag_correlation",
    "mean_offdiag_correlation",
    "median_bandwidth",
    "mir",
    "mir_from_features",
    "mir_run",
    "mmd2_rbf",
    "modality_profile",
    "norm_stats",
    "participation_ratio",
    "pca_basis",
    "pca_histograms",
    "prepare_probe",
    "probe_from_dataset",
    "profile_from_features",
    "profile_run",
    "run_metrics",
    "run_probe",
    "shapes_probe",
    "trace_sqrt_product",
    "visual_degradation",
]
