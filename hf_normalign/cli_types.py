"""The `normalign` command line's option types and choices: each type parses one option's text or raises
``argparse.ArgumentTypeError``, which argparse reports as a usage error (exit 2, one line). Standard library only
(plus hf-normalign's config, imported when a config file is read), so ``--help`` stays light.

Example:
    >>> positive_int("3"), layer_list("0,-1")
    (3, [0, -1])
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Mirrors of hf_normalign.diagnostics' constants (importing them would import torch); a test keeps them equal.
OUTLIER_MODES = ("replace_median", "iqr", "drop", "none")
OUTLIER_STATS = ("torch", "numpy")
TEXT_TOKENS = ("passage", "after_image")
MIR_PRESETS = ("reference",)
SQRT_METHODS = ("exact", "newton_schulz", "reference_fast")
REPORT_METRICS = ("profile", "mir", "key_space", "degradation")


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def pair_count(text: str) -> int:
    """A number of image-text pairs for MIR: at least 2 (its covariances divide by N - 1)."""
    return _int_at_least(text, 2, "an integer of at least 2 (MIR needs 2 image-text pairs)")


def log_base(text: str) -> float:
    """The base of MIR's logarithm: a finite positive number other than 1 (as ``diagnostics.mir`` checks)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0 and value != 1):
        raise argparse.ArgumentTypeError(f"expected a positive number other than 1, got {text!r}")
    return value


def layer_list(text: str) -> list[int]:
    """Parse a layer list: '1,2,5-8,-1' -> [1, 2, 5, 6, 7, 8, -1]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-") if not part.startswith("-") else ("", "", "")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep and lo else [int(part)]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"bad layer list {text!r}: use e.g. 1,2,5-8,-1") from err
    return out


def existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is not an existing directory")
    return text


def _looks_like_path(text: str) -> bool:
    """A local path rather than a Hub repo id: it starts with '.', '~' or a separator, or has a separator other than
    the one '/' of ``namespace/name``."""
    separators = {os.sep, os.altsep or os.sep}
    return text.startswith((".", "~", *separators)) or text.count("/") > 1 or any(s in text for s in separators - {"/"})


def hub_repo_id(text: str) -> str:
    """A Hub repo id (``name`` or ``namespace/name``), checked by huggingface_hub's own rule."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub repo id: {err}") from err
    return text


def model_source(text: str) -> str:
    """A local model folder or a Hub repo id. A path that does not exist is reported as such (a usage error), not
    handed to the Hub, which would answer "Repo id must be in the form ..."."""
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{text} is a file: give the model folder (the one holding config.json)")
    if not _looks_like_path(text):
        with contextlib.suppress(argparse.ArgumentTypeError):
            return hub_repo_id(text)
    raise argparse.ArgumentTypeError(
        f"the local path {text} does not exist (and it is not a Hub repo id): check the spelling"
    )


def metric_list(text: str) -> list[str]:
    """Report metrics: a non-empty comma-separated subset of :data:`REPORT_METRICS`."""
    metrics = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in REPORT_METRICS]
    if unknown or not metrics:
        raise argparse.ArgumentTypeError(f"unknown metrics {unknown}: choose from {','.join(REPORT_METRICS)}")
    return metrics


def output_dir(text: str) -> Path:
    """A folder that exists or can be created (its nearest existing ancestor is a writable folder)."""
    path = os.path.abspath(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder: choose another output folder")
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create or write {text}: {ancestor} is not a writable folder")
    return Path(text)


def output_file(text: str) -> Path:
    """A file path whose folder exists and is writable."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder: give a file name, e.g. {os.path.join(text, 'x.json')}")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder} does not exist: create it first (mkdir -p {folder})")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"the folder {folder} is not writable")
    return Path(text)


def method_list(text: str) -> Any:
    from .config import NormAlignConfig  # light: dataclasses only

    try:
        return NormAlignConfig.from_methods([m.strip() for m in text.split(",") if m.strip()])
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def config_file(text: str) -> Any:
    from .config import NormAlignConfig

    try:
        with open(text, encoding="utf-8") as f:
            return NormAlignConfig.from_dict(json.load(f))
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {err.strerror}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise argparse.ArgumentTypeError(f"{text} is not UTF-8 JSON: {err}") from err
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"{text}: {err}") from err


def aligned_dir(text: str) -> str:
    existing_dir(text)
    if not os.path.isfile(os.path.join(text, "normalign_config.json")):
        raise argparse.ArgumentTypeError(
            f"{text} holds no normalign_config.json: save a patched model there first (normalign patch ... --out DIR)"
        )
    return text


# --- commands ----------------------------------------------------------------------------------------------------
