"""``normalign_config.json`` parsed (:class:`CheckpointInfo`) and described from a patched model (:func:`info_for`).

The file's names, fields and checks are in :mod:`.format` (standard library only, shared with the vLLM plugin);
this module adds what needs hf-normalign itself: the method settings as a :class:`NormAlignConfig`, and the base
model's description read through :class:`~hf_normalign.model_view.ModelView`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import METHODS, NormAlignConfig
from ..model_view import ModelView
from ..patching import NormAlignModules
from .format import CONFIG_NAME, FORMAT_VERSION, NormAlignCheckpointError, SchemaError, validate


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
        """Validate and parse; ``source`` names the file in error messages. Types are strict (JSON booleans,
        integers, strings: nothing is coerced), and format 2 requires the SHA-256 of every weights file."""
        try:
            version = validate(data, source, f"hf-normalign {library_version()}")
        except SchemaError as err:
            raise NormAlignCheckpointError(str(err)) from None
        try:
            config = NormAlignConfig.from_dict(data["methods"])
        except (TypeError, ValueError) as err:
            raise NormAlignCheckpointError(f"{source}: invalid 'methods': {err}") from err
        if not config.methods:
            raise NormAlignCheckpointError(f"{source} enables no method under 'methods'; expected any of {METHODS}.")
        return cls(
            config=config,
            base_model_type=data["base_model_type"],
            base_model_class=data["base_model_class"],
            hidden_size=data["hidden_size"],
            num_decoder_layers=data["num_decoder_layers"],
            adapter_only=data.get("adapter_only", False),
            base_model_name_or_path=data.get("base_model_name_or_path"),
            base_model_revision=data.get("base_model_revision"),
            modules_to_save=tuple(data.get("modules_to_save", ())),
            format_version=version,
            library_version=data.get("library_version"),
            sha256=dict(data.get("sha256", {})),
        )

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
    """(model_type, LLM hidden size, number of decoder layers) of the transformers model in ``model``, as its spec
    sees them (ValueError for a family with no spec)."""
    view = ModelView.of(model)
    return view.config.model_type, view.hidden_size, view.num_layers


def info_for(
    base: nn.Module,
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
