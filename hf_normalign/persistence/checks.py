"""Checks of a checkpoint against the model it is loaded on, and strict reading of its weights files.

Each failure is a :class:`NormAlignCheckpointError` naming the file, what disagrees, and the fix.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from transformers.utils import logging

from ..registry import get_spec
from .format import CONFIG_NAME, NormAlignCheckpointError, file_sha256
from .info import CheckpointInfo, describe_model
from .switch import AUTOLOAD_ENV

logger = logging.get_logger(__name__)


def check_base(model: nn.Module, info: CheckpointInfo, source: str) -> None:
    try:
        found = describe_model(model)
    except ValueError as err:
        raise NormAlignCheckpointError(
            f"{source} is an hf-normalign checkpoint for {info.base_model_class}, which cannot be patched on the "
            f"loaded {type(model).__name__}: {err} Load it with AutoModelForImageTextToText or "
            f"{info.base_model_class}, or switch load-time patching off (hf_normalign.autoload(False) or "
            f"{AUTOLOAD_ENV}=0) to get the base model."
        ) from err
    expected = (info.base_model_type, info.hidden_size, info.num_decoder_layers)
    if found != expected:
        kind = "adapter" if info.adapter_only else "checkpoint"
        fix = (
            "Load it on the base it was trained on: pass base_model=... or correct base_model_name_or_path in "
            f"{CONFIG_NAME}."
            if info.adapter_only
            else f"{CONFIG_NAME} does not describe the weights beside it; re-save the model."
        )
        raise NormAlignCheckpointError(
            f"The hf-normalign {kind} at {source} was made for the base model {info.describe_base()}, but the model "
            f"it is loaded on is {type(model).__name__} (model_type {found[0]!r}, hidden size {found[1]}, "
            f"{found[2]} decoder layers). {fix}"
        )


def _verify(path: str, info: CheckpointInfo) -> None:
    """The file's SHA-256 against the one recorded in normalign_config.json (format 2 records one for every weights
    file; format 1, hf-normalign 0.1.0, may record none)."""
    name = os.path.basename(path)
    expected = info.sha256.get(name)
    if expected is None:
        logger.warning(
            f"{path} is not verified: its {CONFIG_NAME} (checkpoint format {info.format_version}, hf-normalign 0.1.0) "
            "records no SHA-256. Re-save the model to add one."
        )
    elif file_sha256(path) != expected:
        raise NormAlignCheckpointError(
            f"{path} does not match the SHA-256 recorded in {CONFIG_NAME} (damaged, truncated, or from another "
            "save): re-save the model, or re-download it (force_download=True)."
        )


def read_tensors(path: str, info: CheckpointInfo) -> dict[str, torch.Tensor]:
    _verify(path, info)
    try:
        tensors = load_file(path)
    except SafetensorError as err:
        raise NormAlignCheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    bad = sorted(key for key, value in tensors.items() if value.is_floating_point() and not value.isfinite().all())
    if bad:
        raise NormAlignCheckpointError(
            f"{path} holds non-finite values (NaN or inf) in {bad}: the weights are damaged or training diverged. "
            "Load an earlier checkpoint."
        )
    return tensors


def check_before_building(source: str, info: CheckpointInfo, config_path: str, weights: str) -> None:
    """What can be checked without building the model: the base's config.json exists and matches, and the
    plugin weights have the recorded hidden size. A missing config.json would otherwise make transformers
    build a default-size (7B) model."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(os.path.dirname(config_path))
        found = (config.model_type, get_spec(config).hidden_size(config))
    except (OSError, ValueError, KeyError) as err:
        raise NormAlignCheckpointError(f"{config_path} cannot be read as the base model's config: {err}") from err
    if found != (info.base_model_type, info.hidden_size):
        raise NormAlignCheckpointError(
            f"{source}: config.json describes model_type {found[0]!r} with hidden size {found[1]}, but {CONFIG_NAME} "
            f"records {info.describe_base()}. The files come from different models: re-save the checkpoint."
        )
    _verify(weights, info)
    try:
        with safe_open(weights, framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise NormAlignCheckpointError(f"{weights} is not a readable safetensors file: {err}") from err
    wrong = sorted(
        k
        for k, shape in shapes.items()
        if k.startswith(("projector_norm.", "moca.")) and shape[-1:] != [info.hidden_size]
    )
    if wrong:
        raise NormAlignCheckpointError(
            f"{weights}: {wrong} do not have the hidden size {info.hidden_size} that {CONFIG_NAME} records. The "
            "weights were saved from a model of another size: load them on the base they were trained with."
        )


def check_state(path: str, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Key and shape agreement, reported with the file and the keys (quantised targets first: their keys differ)."""
    quantised = sorted(key for key, value in expected.items() if not value.is_floating_point())
    if quantised:
        raise NormAlignCheckpointError(
            f"{path}: {what} is quantised in the loaded model ({quantised[:3]}), so the full-precision weights of "
            f"this file cannot be loaded into it. Keep it unquantised: BitsAndBytesConfig(..., "
            f"llm_int8_skip_modules=['lm_head', '{what}'])."
        )
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    # load_state_dict would cast an int64 / bool tensor into the float parameter: its values, silently truncated.
    not_float = sorted(
        f"{key} ({found[key].dtype})"
        for key, value in expected.items()
        if key in found and value.is_floating_point() and not found[key].is_floating_point()
    )
    if not_float:
        raise NormAlignCheckpointError(
            f"{path} holds non-floating tensors where {what} has floating-point weights: {not_float}. The file was "
            "edited or written by another tool: re-save the model."
        )
    if missing or unexpected:
        raise NormAlignCheckpointError(
            f"{path} does not match {what}: missing keys {missing}, unexpected keys {unexpected}. The weights and "
            f"{CONFIG_NAME} come from different saves (or one was edited): re-save the model."
        )
    mismatched = [
        f"{key}: file {tuple(found[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if found[key].shape != value.shape
    ]
    if mismatched:
        raise NormAlignCheckpointError(
            f"{path} has shape mismatches with {what}: {'; '.join(mismatched)}. The weights were saved from a model "
            "of another size (e.g. a different hidden size): load them on the base they were trained with."
        )
