"""The aligned-checkpoint format: file names, format version, the fields of ``normalign_config.json`` and their
JSON types (the one strict reading that hf-normalign and its vLLM plugin both apply), checksums, the weights files
a save supersedes, and the error type.

Standard library only, so that the vLLM plugin loads this very file on its own (``normalign_vllm.core.SOURCES``)
instead of copying it. The parsed form, :class:`~hf_normalign.persistence.info.CheckpointInfo`, is in ``info``.

Nothing is converted: booleans are JSON booleans, integers JSON integers (``true`` is not ``1``, ``"64"`` and
``64.9`` are not ``64``), strings strings, lists lists. Format 1 is what hf-normalign 0.1.0 wrote, which may lack
``sha256``; format 2 requires the SHA-256 of every weights file the checkpoint has.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

CONFIG_NAME = "normalign_config.json"

WEIGHTS_NAME = "normalign.safetensors"

MODULES_NAME = "normalign_modules.safetensors"

FORMAT_VERSION = 2


class SchemaError(ValueError):
    """``normalign_config.json`` does not have the fields and types of a checkpoint format this release reads."""


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value != ""


# Each kind: what the error says it must be, and the check.
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "object": ("a JSON object", lambda v: isinstance(v, dict)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int": ("a JSON integer >= 1", _is_positive_int),
    "name": ("a non-empty string", _is_name),
    "class": ("a Python class name", lambda v: isinstance(v, str) and v.isidentifier()),
    "optional name": ("a non-empty string or null", lambda v: v is None or _is_name(v)),
    "names": (
        'a list of module paths (["model.multi_modal_projector"]; a string is not a list)',
        lambda v: isinstance(v, list) and all(_is_name(e) for e in v),
    ),
}

# key -> (kind, required in every format); "sha256" is required from format 2 on. Other keys are ignored: fields may
# be added within a format version.
FIELDS: dict[str, tuple[str, bool]] = {
    "library_version": ("optional name", False),
    "methods": ("object", True),
    "adapter_only": ("bool", False),
    "base_model_name_or_path": ("optional name", False),
    "base_model_revision": ("optional name", False),
    "base_model_type": ("name", True),
    "base_model_class": ("class", True),
    "hidden_size": ("int", True),
    "num_decoder_layers": ("int", True),
    "modules_to_save": ("names", False),
    "sha256": ("object", False),
}


def validate(data: Any, source: str, reader: str) -> int:
    """Check ``data`` (the parsed file ``source``) and return its format version; ``reader`` names the release
    reading it in the messages. Raises :class:`SchemaError` naming the file, the field, the value and the fix."""
    if not isinstance(data, dict):
        raise SchemaError(f"{source} must hold a JSON object, got {type(data).__name__}.")
    version = data.get("format_version")
    if not _is_positive_int(version):
        raise SchemaError(
            f"{source} has an unknown format_version {version!r}; {reader} reads format 1..{FORMAT_VERSION}. The file "
            "is not an hf-normalign checkpoint config, or it was edited."
        )
    if version > FORMAT_VERSION:
        raise SchemaError(
            f"{source} uses checkpoint format {version} (written by hf-normalign {data.get('library_version', '?')}); "
            f"{reader} reads format {FORMAT_VERSION} at most. Upgrade: pip install -U hf-normalign."
        )
    missing = [key for key, (_, needed) in FIELDS.items() if (needed or (key == "sha256" and version >= 2))]
    missing = [key for key in missing if key not in data]
    if missing:
        raise SchemaError(f"{source} lacks the keys {missing}; re-save the model with hf-normalign.")
    wrong = [
        f"{key!r} must be {_KINDS[kind][0]}, got {data[key]!r} ({type(data[key]).__name__})"
        for key, (kind, _) in FIELDS.items()
        if key in data and not _KINDS[kind][1](data[key])
    ]
    if wrong:
        raise SchemaError(
            f"{source}: {'; '.join(wrong)}. Values are read as written, never converted: the file was edited or "
            "written by another tool; correct it or re-save the model."
        )
    _check_hashes(source, data.get("sha256", {}), version, bool(data.get("modules_to_save")))
    return version


def _check_hashes(source: str, hashes: dict[str, Any], version: int, has_modules: bool) -> None:
    """Digests of known weights files only; from format 2, one for each weights file the checkpoint has."""
    known = {WEIGHTS_NAME, MODULES_NAME}
    if not all(k in known and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in hashes.items()):
        raise SchemaError(
            f"{source}: 'sha256' must map the weights files {sorted(known)} to SHA-256 hex digests, got {hashes!r}. "
            "The file was edited: re-save the model."
        )
    needed = [WEIGHTS_NAME, *([MODULES_NAME] if has_modules else [])] if version >= 2 else []
    absent = [name for name in needed if name not in hashes]
    if absent:
        raise SchemaError(
            f"{source} (checkpoint format {version}) records no SHA-256 for {absent}, so their integrity cannot be "
            "checked. The file was edited: restore its 'sha256' entries, or re-save the model."
        )


# --- files -------------------------------------------------------------------------------------------------------

PLUGIN_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, MODULES_NAME})

BASE_CONFIG_NAME = "config.json"


class NormAlignCheckpointError(ValueError):
    """An aligned checkpoint is malformed, inconsistent, or does not fit the model it is loaded on."""


def is_base_weights(name: str, variant: str | None = None, *, peft: bool = False) -> bool:
    """Whether ``name`` is a weights file transformers writes for a model saved with ``variant`` (or, ``peft``,
    for its loaded PEFT adapter): the single file, the shards and the index, in safetensors or the older .bin form.
    A save that does not write such a file supersedes it."""
    if peft:
        return re.fullmatch(r"adapter_model(-\d{5}-of-\d{5})?\.(safetensors|bin)", name) is not None
    tag = re.escape(f".{variant}") if variant else ""
    weights = rf"(model|pytorch_model){tag}(-\d{{5}}-of-\d{{5}})?\.(safetensors|bin)"
    index = rf"(model\.safetensors|pytorch_model\.bin)\.index{tag}\.json"
    return re.fullmatch(f"{weights}|{index}", name) is not None


def file_sha256(path: str) -> str:
    """The hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
