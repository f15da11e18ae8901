"""Probe sets and their encoding: the probe types and the built-in offline probe (:mod:`.probe`, its images drawn
by :mod:`.drawing`), loaders of your own pairs (:mod:`.loading`), the labelled shapes probe (:mod:`.shapes`), and
turning a probe into model inputs with exact passage positions (:mod:`.encoding`).

Example:
    >>> from hf_normalign.diagnostics.probes import default_probe
    >>> len(default_probe(5))
    5
"""

from .encoding import (
    MAX_PASSAGE_TOKENS,
    TEXT_TOKENS,
    EncodedSample,
    check_samples,
    encode_probe,
    image_placeholder,
    pad_token_id,
    prepare_probe,
    probe_description,
    select_text_tokens,
)
from .loading import load_probe, probe_from_dataset
from .probe import (
    DEFAULT_KINDS,
    DEFAULT_PROBE_SIZE,
    IMAGE_EXTENSIONS,
    Probe,
    ProbeSample,
    default_passages,
    default_probe,
    sample_indices,
)
from .shapes import SHAPE_CLASSES, LabelledProbe, labels_from_names, shapes_probe

__all__ = [
    "DEFAULT_KINDS",
    "DEFAULT_PROBE_SIZE",
    "IMAGE_EXTENSIONS",
    "MAX_PASSAGE_TOKENS",
    "SHAPE_CLASSES",
    "TEXT_TOKENS",
    "EncodedSample",
    "LabelledProbe",
    "Probe",
    "ProbeSample",
    "check_samples",
    "default_passages",
    "default_probe",
    "encode_probe",
    "image_placeholder",
    "labels_from_names",
    "load_probe",
    "pad_token_id",
    "prepare_probe",
    "probe_description",
    "probe_from_dataset",
    "sample_indices",
    "select_text_tokens",
    "shapes_probe",
]
