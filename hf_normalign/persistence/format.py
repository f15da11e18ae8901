"""The aligned-checkpoint format: file names, ``normalign_config.json`` (:class:`CheckpointInfo`), format
version, checksums and the error type. Reads and writes nothing but the config file; imports no loading code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from ..config import METHODS, NormAlignConfig
from ..patching import NormAlignModules
from ..registry import get_spec

CONFIG_NAME = "normalign_config.json"

WEIGHTS_NAME = "normalign.safetensors"

MODULES_NAME = "normalign_modules.safetensors"

FORMAT_VERSION = 1

PLUGIN_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, MODULES_NAME})


class NormAlignCheckpointError(ValueError):
    """An aligned checkpoint is malformed, inconsistent, or does not fit the model it is loaded on."""


@dataclass(frozen=True)
class CheckpointInfo:
    """The content of ``normalign_config.json``.

    Example:
        >>> info = CheckpointInfo.from_file("aligned/normalign_config.json")   # doctest: +SKIP
        >>> info.config.methods, info.base_model_type                         # doctest: +SKIP
        (['projector_norm', 'moca'], 'llava')
    """

    config: NormAlignConfig
    base_model_type: str
    base_model_class: str
    hidden_size: int
    num_decoder_layers: int
    adapter_only: bool = False
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    modules_to_save: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION
    library_version: str | None = None
    sha256: dict[str, str] = dataclasses.field(default_factory=dict)  # weights file name -> hex digest

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "library_version": self.library_version,
            "methods": self.config.to_dict(),
            "adapter_only": self.adapter_only,
            "base_model_name_or_path": self.base_model_name_or_path,
            "base_model_revision": self.base_model_revision,
            "base_model_type": self.base_model_type,
            "base_model_class": self.base_model_class,
            "hidden_size": self.hidden_size,
            "num_decoder_layers": self.num_decoder_layers,
            "modules_to_save": list(self.modules_to_save),
            "sha256": dict(sorted(self.sha256.items())),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = CONFIG_NAME) -> CheckpointInfo:
        """Validate and parse; ``source`` names the file in error messages."""
        if not isinstance(data, dict):
            raise NormAlignCheckpointError(f"{source} must hold a JSON object, got {type(data).__name__}.")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise NormAlignCheckpointError(
                f"{source} has an unknown format_version {version!r}; hf-normalign {library_version()} reads "
                f"format 1..{FORMAT_VERSION}. The file is not an hf-normalign checkpoint config, or it was edited."
            )
        if version > FORMAT_VERSION:
            raise NormAlignCheckpointError(
                f"{source} uses checkpoint format {version} (written by hf-normalign "
                f"{data.get('library_version', '?')}); hf-normalign {library_version()} reads format "
                f"{FORMAT_VERSION} at most. Upgrade: pip install -U hf-normalign."
            )
        required = ("methods", "base_model_type", "base_model_class", "hidden_size", "num_decoder_layers")
        missing = [key for key in required if key not in data]
        if missing:
            raise NormAlignCheckpointError(f"{source} lacks the keys {missing}; re-save the model with hf-normalign.")
        try:
            config = NormAlignConfig.from_dict(data["methods"] or {})
        except (TypeError, ValueError) as err:
            raise NormAlignCheckpointError(f"{source}: invalid 'methods': {err}") from err
        if not config.methods:
            raise NormAlignCheckpointError(f"{source} enables no method under 'methods'; expected any of {METHODS}.")
        hashes = data.get("sha256") or {}
        if not isinstance(hashes, dict) or not all(
            isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in hashes.values()
        ):
            raise NormAlignCheckpointError(
                f"{source}: 'sha256' must map weights file names to SHA-256 hex digests, got {hashes!r}. The file "
                "was edited: re-save the model."
            )
        try:
            return cls(
                config=config,
                base_model_type=str(data["base_model_type"]),
                base_model_class=str(data["base_model_class"]),
                hidden_size=int(data["hidden_size"]),
                num_decoder_layers=int(data["num_decoder_layers"]),
                adapter_only=bool(data.get("adapter_only", False)),
                base_model_name_or_path=data.get("base_model_name_or_path"),
                base_model_revision=data.get("base_model_revision"),
                modules_to_save=tuple(data.get("modules_to_save") or ()),
                format_version=version,
                library_version=data.get("library_version"),
                sha256=dict(hashes),
            )
        except (TypeError, ValueError) as err:
            raise NormAlignCheckpointError(f"{source}: malformed value: {err}") from err

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> CheckpointInfo:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise NormAlignCheckpointError(
                f"{path} is not valid UTF-8 JSON ({err}): the checkpoint is damaged; re-save or re-download it."
            ) from err
        return cls.from_dict(data, source=path)

    def describe_base(self) -> str:
        name = f"{self.base_model_name_or_path!r} " if self.base_model_name_or_path else ""
        return (
            f"{name}({self.base_model_class}, model_type {self.base_model_type!r}, hidden size {self.hidden_size}, "
            f"{self.num_decoder_layers} decoder layers)"
        )


def library_version() -> str:
    import hf_normalign  # the package is fully imported by the time anything here runs

    return hf_normalign.__version__


def describe_model(model: nn.Module) -> tuple[str, int, int]:
    """(model_type, LLM hidden size, number of decoder layers) as the spec sees them."""
    spec = get_spec(model)
    return model.config.model_type, spec.hidden_size(model.config), len(spec.decoder_layers(model))


def info_for(
    base: PreTrainedModel,
    plugin: NormAlignModules,
    *,
    adapter_only: bool,
    base_model_name_or_path: str | None,
    base_model_revision: str | None = None,
    modules_to_save: Sequence[str] = (),
) -> CheckpointInfo:
    model_type, hidden, layers = describe_model(base)
    return CheckpointInfo(
        config=NormAlignConfig.from_dict(plugin.config.to_dict()),
        base_model_type=model_type,
        base_model_class=type(base).__name__,
        hidden_size=hidden,
        num_decoder_layers=layers,
        adapter_only=adapter_only,
        base_model_name_or_path=base_model_name_or_path or None,
        base_model_revision=base_model_revision,
        modules_to_save=tuple(modules_to_save),
        library_version=library_version(),
    )


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
