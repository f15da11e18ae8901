"""Read an aligned checkpoint for serving: ``normalign_config.json`` and the verified ``normalign.safetensors``.

The file names, the field checks and the checksum are ``hf_normalign/persistence/format.py`` itself, loaded by path
(``hf_normalign.persistence`` cannot be imported here: see core.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file

from . import core

CONFIG_NAME = core.get("format", "CONFIG_NAME")
WEIGHTS_NAME = core.get("format", "WEIGHTS_NAME")
TRAINING_ONLY_PREFIX = "pre_head."


class NormAlignServingError(ValueError):
    """An aligned checkpoint cannot be served as it is (malformed, adapter-only, or tampered with)."""


@dataclass(frozen=True)
class ServingCheckpoint:
    """What vLLM needs from ``normalign_config.json`` (inference methods only; PRe is training-only)."""

    folder: str
    config: Any  # hf_normalign.config.NormAlignConfig, loaded standalone
    hidden_size: int
    num_decoder_layers: int
    sha256: str | None  # of normalign.safetensors; format 1 (hf-normalign 0.1.0) may record none

    @property
    def moca_layers(self) -> list[int]:
        moca = self.config.moca
        if moca is None:
            return []
        return list(range(self.num_decoder_layers)) if moca.layers is None else list(moca.layers)

    @property
    def weights_path(self) -> str:
        return os.path.join(self.folder, WEIGHTS_NAME)


def find(model: str, revision: str | None = None) -> ServingCheckpoint | None:
    """The aligned checkpoint at ``model`` (a local folder or a Hub repo id), or None for a plain model."""
    if os.path.isdir(model):
        path = os.path.join(model, CONFIG_NAME)
        return parse(path) if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(model, CONFIG_NAME, revision=revision)
    except EntryNotFoundError:
        return None
    hf_hub_download(model, WEIGHTS_NAME, revision=revision)  # same snapshot folder as the config
    return parse(path)


def parse(path: str) -> ServingCheckpoint:
    """Validate ``normalign_config.json`` at ``path``; errors name the file and the fix."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NormAlignServingError(f"{path} is not valid UTF-8 JSON: {err}") from err
    try:  # the same strict reading as hf-normalign's loader: types as written, SHA-256 required from format 2
        core.get("format", "validate")(data, path, "hf-normalign's vLLM plugin")
    except core.get("format", "SchemaError") as err:
        raise NormAlignServingError(str(err)) from None
    if data.get("adapter_only", False):
        raise NormAlignServingError(
            f"{path} describes an adapter-only checkpoint (no base weights beside it); vLLM needs full weights. "
            "Save the merged model with hf_normalign.save_pretrained(model, folder) and serve that folder."
        )
    try:
        config = core.get("config", "NormAlignConfig").from_dict(data["methods"])
    except (TypeError, ValueError) as err:
        raise NormAlignServingError(f"{path}: invalid 'methods' ({err}); re-save the model with hf-normalign.") from err
    sha256 = data.get("sha256", {}).get(WEIGHTS_NAME)
    return ServingCheckpoint(os.path.dirname(path), config, data["hidden_size"], data["num_decoder_layers"], sha256)


def read_weights(checkpoint: ServingCheckpoint, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``normalign.safetensors``, checksum-verified, with exactly the keys and shapes of ``expected``."""
    path = checkpoint.weights_path
    if not os.path.isfile(path):
        raise NormAlignServingError(f"{path} is missing: the checkpoint is incomplete; re-save the model.")
    if checkpoint.sha256 is not None and core.get("format", "file_sha256")(path) != checkpoint.sha256:
        raise NormAlignServingError(
            f"{path} does not match the SHA-256 recorded in {CONFIG_NAME} (damaged, truncated, or from another "
            "save): re-save or re-download the model."
        )
    # PRe's head is training-only: it may be in the file and is not served.
    tensors = {key: value for key, value in load_file(path).items() if not key.startswith(TRAINING_ONLY_PREFIX)}
    not_float = sorted(f"{key} ({value.dtype})" for key, value in tensors.items() if not value.is_floating_point())
    if not_float:
        raise NormAlignServingError(
            f"{path} holds non-floating tensors {not_float}: plugin weights are floating point. The file was edited "
            "or written by another tool: re-save the model."
        )
    found = {key: tuple(value.shape) for key, value in tensors.items()}
    wanted = {key: tuple(value.shape) for key, value in expected.items()}
    if found != wanted:
        raise NormAlignServingError(
            f"{path} holds {found}, but {CONFIG_NAME} describes {wanted}: the two files come from different "
            "saves (or one was edited). Re-save the model."
        )
    return tensors


def weight_names(checkpoint: ServingCheckpoint) -> frozenset[str]:
    """Tensor names in ``normalign.safetensors``: vLLM's loader reads every ``*.safetensors`` of the folder."""
    from safetensors import safe_open

    if not os.path.isfile(checkpoint.weights_path):
        return frozenset()
    with safe_open(checkpoint.weights_path, "pt") as f:
        return frozenset(f.keys())
