"""Aligned checkpoints: saving, loading, load-time patching and the adapter-only form.

An aligned checkpoint is a vanilla transformers checkpoint plus two files::

    config.json, generation_config.json, model.safetensors   # exactly what transformers writes for the base
    normalign_config.json                                     # method settings, format version, base model
    normalign.safetensors                                     # plugin weights, plugin-local names

The adapter-only form drops the base files: ``normalign_config.json`` names the base
(``base_model_name_or_path``), and ``normalign_modules.safetensors`` optionally carries modules trained
alongside the plugin (the projector after stage-1 alignment) under the base model's parameter names.

After ``import hf_normalign``:

- ``model.save_pretrained(path)`` on a patched model writes the layout above, atomically;
- ``normalign.from_pretrained(path_or_repo_id)``, ``AutoNormAlignModelForImageTextToText.from_pretrained``
  and transformers' own ``AutoModelForImageTextToText`` / ``LlavaForConditionalGeneration`` (...)
  ``from_pretrained`` return the patched model when the checkpoint holds ``normalign_config.json``.
  Switch load-time patching off with ``HF_NORMALIGN_AUTOLOAD=0`` or ``normalign.autoload(False)``.

Example:
    >>> import hf_normalign as normalign
    >>> model = normalign.patch(normalign.testing.tiny_model("llava"), methods="moca")
    >>> model.save_pretrained("aligned")                                   # doctest: +SKIP
    >>> model = normalign.from_pretrained("aligned")                       # doctest: +SKIP
    >>> normalign.save_pretrained(model, "adapter", adapter_only=True)     # doctest: +SKIP

Nothing here writes or reads pickle: weights go through ``safetensors.torch`` only.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging
from transformers.utils.hub import cached_file

from ._install import install as install  # re-exported: persistence.install()
from .config import METHODS, NormAlignConfig
from .patching import ATTRIBUTE, NormAlignModules, _base_model, get_plugin, patch, unpatch
from .registry import get_spec

logger = logging.get_logger(__name__)

CONFIG_NAME = "normalign_config.json"
WEIGHTS_NAME = "normalign.safetensors"
MODULES_NAME = "normalign_modules.safetensors"
FORMAT_VERSION = 1
AUTOLOAD_ENV = "HF_NORMALIGN_AUTOLOAD"

_OWN_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, MODULES_NAME})
# The keyword arguments of `from_pretrained` that locate files (forwarded to `cached_file`).
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
_SHARD_RE = re.compile(r"(.*?)-\d{5}-of-\d{5}")


class NormAlignCheckpointError(ValueError):
    """An aligned checkpoint is malformed, inconsistent, or does not fit the model it is loaded on."""


# --- checkpoint description (normalign_config.json) ---------------------------------------------------------


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
                f"{source} has an unknown format_version {version!r}; hf-normalign {_library_version()} reads "
                f"format 1..{FORMAT_VERSION}. The file is not an hf-normalign checkpoint config, or it was edited."
            )
        if version > FORMAT_VERSION:
            raise NormAlignCheckpointError(
                f"{source} uses checkpoint format {version} (written by hf-normalign "
                f"{data.get('library_version', '?')}); hf-normalign {_library_version()} reads format "
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


def _library_version() -> str:
    import hf_normalign  # the package is fully imported by the time anything here runs

    return hf_normalign.__version__


def _describe_model(model: nn.Module) -> tuple[str, int, int]:
    """(model_type, LLM hidden size, number of decoder layers) as the spec sees them."""
    spec = get_spec(model)
    return model.config.model_type, spec.hidden_size(model.config), len(spec.decoder_layers(model))


def _info_for(
    base: PreTrainedModel,
    plugin: NormAlignModules,
    *,
    adapter_only: bool,
    base_model_name_or_path: str | None,
    base_model_revision: str | None = None,
    modules_to_save: Sequence[str] = (),
) -> CheckpointInfo:
    model_type, hidden, layers = _describe_model(base)
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
        library_version=_library_version(),
    )


# --- writing -------------------------------------------------------------------------------------------------


def _plugin_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Clones: safetensors refuses tensors that share storage, and the file must not alias live parameters.
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_files(
    directory: str,
    info: CheckpointInfo,
    plugin_state: dict[str, torch.Tensor],
    module_state: dict[str, torch.Tensor] | None = None,
) -> None:
    # One metadata key only: safetensors writes several in no fixed order, and identical saves should be
    # identical files (reproducible, and deduplicated on the Hub). The version lives in the config file.
    metadata = {"format": "pt"}
    files = {WEIGHTS_NAME: plugin_state, **({MODULES_NAME: module_state} if module_state else {})}
    hashes = {}
    for name, state in files.items():
        path = os.path.join(directory, name)
        _file_operation("write", path)
        save_file(_plugin_tensors(state), path, metadata=metadata)
        hashes[name] = _sha256(path)
    _file_operation("write", os.path.join(directory, CONFIG_NAME))
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(json.dumps(dataclasses.replace(info, sha256=hashes).to_dict(), indent=2) + "\n")


# --- crash-safe directory writes ----------------------------------------------------------------------------------
#
# A save writes everything into a hidden staging folder beside the target, then writes a commit marker into it
# (atomically: a temporary file renamed), then moves each new file over the old one (os.replace, atomic per file)
# and removes the old files the new save replaces (stale shards, plugin files it no longer writes). Files of the
# target that the save does not write (processor, tokenizer, trainer state, notes) are never moved. The next save
# or load of the folder finishes a committed save (`recover`) and removes an uncommitted staging folder, which
# holds only files of the interrupted save.

COMMIT_NAME = ".normalign-commit.json"
_STAGING = ".normalign-staging-"
# Test hook: called with (operation, path) before every file operation of a save (see tests/test_crash_safe_save.py).
_on_file_operation: Callable[[str, str], None] | None = None


def _file_operation(operation: str, path: str) -> None:
    if _on_file_operation is not None:
        _on_file_operation(operation, path)


def _staging_folders(target: str) -> list[str]:
    parent, name = os.path.split(target)
    prefix = f".{name}{_STAGING}"
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return []
    return sorted(os.path.join(parent, e) for e in entries if e.startswith(prefix))


def recover(directory: str | os.PathLike) -> None:
    """Finish or clean up an interrupted save of ``directory`` (called by every save and local load).

    A committed save (its staging folder holds the commit marker) is completed; an uncommitted staging folder
    holds only the interrupted save's own files and is removed, with a warning.

    Example:
        >>> normalign.persistence.recover("out/aligned")   # doctest: +SKIP
    """
    target = os.path.realpath(os.fspath(directory))
    for staging in _staging_folders(target):
        marker = os.path.join(staging, COMMIT_NAME)
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as f:
                plan = json.load(f)
            _apply(staging, target, plan["moves"], plan["removes"])
        else:
            logger.warning(f"Removing {staging}: the unfinished files of an interrupted save of {target}.")
            _file_operation("rmtree", staging)
            shutil.rmtree(staging, ignore_errors=True)


def _apply(staging: str, target: str, moves: list[str], removes: list[str]) -> None:
    """Roll a committed save forward; every step may be repeated after a kill."""
    if not os.path.isdir(target):
        _file_operation("mkdir", target)
        os.makedirs(target, exist_ok=True)
    for entry in moves:
        source = os.path.join(staging, entry)
        if os.path.lexists(source):
            _file_operation("replace", source)
            os.replace(source, os.path.join(target, entry))
    for entry in removes:
        path = os.path.join(target, entry)
        if os.path.lexists(path):
            _file_operation("remove", path)
            os.remove(path)
    _file_operation("remove", os.path.join(staging, COMMIT_NAME))
    os.remove(os.path.join(staging, COMMIT_NAME))
    _file_operation("rmdir", staging)
    os.rmdir(staging)


@contextmanager
def _atomic_directory(target: str | os.PathLike, replaces: Callable[[str], bool]) -> Iterator[str]:
    """Yield an empty staging folder beside ``target``; on success its files replace those of ``target``.

    Entries of ``target`` that the new save did not write stay, except those for which ``replaces(name)`` is
    true (files of the previous save that the new one supersedes). A failure before the commit removes the
    staging folder and leaves ``target`` as it was.
    """
    target = os.path.realpath(os.fspath(target))  # a symlinked checkpoint dir: replace what it points at
    recover(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}{_STAGING}{uuid.uuid4().hex[:8]}")
    _file_operation("mkdir", staging)
    os.mkdir(staging)
    try:
        yield staging
        written = sorted(os.listdir(staging))
        nested = [e for e in written if os.path.isdir(os.path.join(staging, e))]
        if nested:
            raise RuntimeError(f"hf-normalign saves files only; the save wrote the folders {nested} into {staging}.")
        old = os.listdir(target) if os.path.isdir(target) else []
        removes = sorted(e for e in old if e not in written and replaces(e) and os.path.isfile(os.path.join(target, e)))
        temporary = os.path.join(staging, f"{COMMIT_NAME}.tmp")
        _file_operation("write", temporary)
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump({"moves": written, "removes": removes}, f)
        _file_operation("replace", temporary)
        os.replace(temporary, os.path.join(staging, COMMIT_NAME))  # the commit point
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _apply(staging, target, written, removes)


def _stale_shard(name: str, weights_prefix: str) -> bool:
    """transformers' own rule for shards of an earlier save that the new save does not rewrite."""
    stem = name.replace(".bin", "").replace(".safetensors", "")
    return name.startswith(weights_prefix) and _SHARD_RE.fullmatch(stem) is not None


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    adapter_only: bool = False,
    include: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
    base_model_revision: str | None = None,
    **save_kwargs: Any,
) -> str:
    """Save a patched model as an aligned checkpoint, or as an adapter. Returns the directory.

    ``adapter_only=False`` is ``model.save_pretrained(save_directory, **save_kwargs)``: the base files
    exactly as transformers writes them, plus ``normalign_config.json`` and ``normalign.safetensors``.

    ``adapter_only=True`` writes only the hf-normalign files: the plugin weights, and the weights of the
    modules in ``include`` (default ``("projector",)``: the projector, and Qwen3-VL's deepstack mergers;
    other entries are module paths such as ``"model.vision_tower"``) in ``normalign_modules.safetensors``.
    ``base_model_name_or_path`` (default: ``model.name_or_path``) is where loading fetches the base from.

    Example:
        >>> normalign.save_pretrained(model, "adapter", adapter_only=True,
        ...                           base_model_name_or_path="llava-hf/llava-1.5-7b-hf")  # doctest: +SKIP

    The write is atomic: a failure part-way leaves the previous content of ``save_directory`` in place.
    """
    plugin = get_plugin(model)
    if plugin is None:
        raise ValueError(
            "This model is not patched by hf-normalign: nothing to save. Patch it with `hf_normalign.patch` "
            "first, or call `model.save_pretrained` for a plain checkpoint."
        )
    base = _base_model(model)
    if not adapter_only:
        if include is not None or base_model_name_or_path is not None or base_model_revision is not None:
            raise ValueError(
                "include / base_model_name_or_path / base_model_revision describe an adapter: pass adapter_only=True."
            )
        base.save_pretrained(save_directory, **save_kwargs)
        return os.fspath(save_directory)
    if save_kwargs:
        raise TypeError(f"adapter_only=True writes no transformers files; unexpected options {sorted(save_kwargs)}.")
    name = base_model_name_or_path or getattr(base, "name_or_path", "") or None
    if name is None:
        raise ValueError(
            "The adapter must name its base model, and this model does not know where it was loaded from: pass "
            "base_model_name_or_path='org/name' (a Hub repo id or a local directory)."
        )
    paths = _module_paths(base, plugin, ("projector",) if include is None else include)
    module_state = {
        f"{path}.{key}": value for path in paths for key, value in base.get_submodule(path).state_dict().items()
    }
    quantised = sorted(key for key, value in module_state.items() if not value.is_floating_point())
    if quantised:
        raise ValueError(
            f"The modules {paths} are quantised ({quantised[:3]} ...): an adapter stores full-precision weights. Load "
            f"the base with BitsAndBytesConfig(llm_int8_skip_modules=['lm_head', {', '.join(map(repr, paths))}]) to "
            "keep them trainable, or pass include=() to save the plugin alone."
        )
    info = _info_for(
        base,
        plugin,
        adapter_only=True,
        base_model_name_or_path=name,
        base_model_revision=base_model_revision,
        modules_to_save=paths,
    )
    with _atomic_directory(save_directory, replaces=lambda entry: entry in _OWN_FILES) as staging:
        _write_files(staging, info, plugin.state_dict(), module_state)
    return os.fspath(save_directory)


def _module_paths(base: nn.Module, plugin: NormAlignModules, include: Sequence[str]) -> list[str]:
    if isinstance(include, str):
        include = (include,)
    spec = plugin.spec
    paths: list[str] = []
    for entry in include:
        for path in (spec.projector, *spec.extra_projectors) if entry == "projector" else (entry,):
            spec.get(base, path)  # a clear error for a path that does not exist
            if path not in paths:
                paths.append(path)
    return paths


# --- save_pretrained interception ----------------------------------------------------------------------------


@contextmanager
def _plugin_detached(model: nn.Module) -> Iterator[None]:
    """Hide ``model.normalign`` from the module tree, so transformers saves the base model alone."""
    modules = model._modules
    saved = dict(modules)
    del modules[ATTRIBUTE]
    try:
        yield
    finally:
        modules.clear()
        modules.update(saved)  # the same order as before, so state_dict order is unchanged


def _save_wrapper(wrapped: Callable[..., Any], instance: PreTrainedModel, args: tuple, kwargs: dict) -> Any:
    base = _base_model(instance)
    plugin = get_plugin(base)
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    arguments = bound.arguments
    save_directory = os.fspath(arguments["save_directory"])
    is_main_process = arguments.get("is_main_process", True)
    if plugin is None:
        result = wrapped(*args, **kwargs)
        if is_main_process:
            _remove_stale_plugin_files(save_directory)
        return result
    if arguments.get("distributed_checkpoint") or os.path.isfile(save_directory):
        # DCP checkpoints are for resuming training and keep the whole module tree, plugin included;
        # a file path gets transformers' own error.
        return wrapped(*args, **kwargs)

    extra = arguments.setdefault("kwargs", {})
    push = arguments.pop("push_to_hub", False)
    hub_options = {key: extra.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private") if key in extra}
    plugin_state = plugin.state_dict()
    state_dict = arguments.get("state_dict")
    if state_dict is not None:  # Trainer / FSDP pass a gathered state dict: split it
        prefix = f"{ATTRIBUTE}."
        given = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        plugin_state = given or plugin_state
        arguments["state_dict"] = {key: value for key, value in state_dict.items() if not key.startswith(prefix)}

    if not _saves_on_this_rank(instance, is_main_process):
        with _plugin_detached(base):  # other ranks only join transformers' collectives; they write nothing
            return wrapped(*bound.args, **bound.kwargs)

    info = _info_for(base, plugin, adapter_only=False, base_model_name_or_path=instance.name_or_path)
    variant = arguments.get("variant")
    if getattr(instance, "_hf_peft_config_loaded", False):
        weights_prefix = "adapter_model"
    else:
        weights_prefix = f"model.{variant}" if variant else "model"

    def replaces(entry: str) -> bool:
        return entry in _OWN_FILES or _stale_shard(entry, weights_prefix)

    with _atomic_directory(save_directory, replaces) as staging:
        arguments["save_directory"] = staging
        with _plugin_detached(base):
            result = wrapped(*bound.args, **bound.kwargs)
        _write_files(staging, info, plugin_state)
    if push:
        from .hub import push_to_hub

        push_to_hub(
            save_directory,
            hub_options.pop("repo_id", os.path.basename(os.path.realpath(save_directory))),
            token=arguments.get("token"),
            **hub_options,
        )
    return result


def _saves_on_this_rank(model: PreTrainedModel, is_main_process: bool) -> bool:
    check = getattr(model, "should_save_on_this_rank", None)  # newer transformers also check the rank
    return check(is_main_process) if check is not None else is_main_process


def _remove_stale_plugin_files(directory: str) -> None:
    """An unpatched model saved over an aligned checkpoint: its old plugin files no longer belong to it."""
    stale = [name for name in sorted(_OWN_FILES) if os.path.isfile(os.path.join(directory, name))]
    if stale:
        logger.warning(
            f"{directory} held hf-normalign files {stale} from an earlier save; this model is not patched, so they "
            "were removed (they would re-apply an old intervention on load)."
        )
        for name in stale:
            os.remove(os.path.join(directory, name))


# --- loading -------------------------------------------------------------------------------------------------

_loading_base: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_normalign_loading_base", default=False)
_autoload_enabled = True


class autoload:
    """Switch load-time patching of transformers' ``from_pretrained`` on or off.

    Called plainly it sets the switch; used as a context manager it restores the previous setting on exit.
    The environment variable ``HF_NORMALIGN_AUTOLOAD=0`` switches it off as well (read at each load).

    Example:
        >>> with normalign.autoload(False):                                         # doctest: +SKIP
        ...     base = AutoModelForImageTextToText.from_pretrained("aligned")    # the base, unpatched
        >>> normalign.autoload(False)   # off from here on                         # doctest: +SKIP
    """

    def __init__(self, enabled: bool) -> None:
        global _autoload_enabled
        self._previous = _autoload_enabled
        _autoload_enabled = bool(enabled)

    def __repr__(self) -> str:
        return f"autoload(enabled={_autoload_enabled})"

    def __enter__(self) -> autoload:
        return self

    def __exit__(self, *exc: object) -> None:
        global _autoload_enabled
        _autoload_enabled = self._previous


def autoload_enabled() -> bool:
    """Whether transformers' ``from_pretrained`` patches aligned checkpoints right now."""
    env = os.environ.get(AUTOLOAD_ENV, "1").strip().lower()
    return _autoload_enabled and env not in ("0", "false", "no", "off")


@contextmanager
def _base_load() -> Iterator[None]:
    """Inside: our own loads of the base model, which the load-time wrappers must pass through."""
    token = _loading_base.set(True)
    try:
        yield
    finally:
        _loading_base.reset(token)


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}


def _find_config(source: Any, kwargs: dict[str, Any]) -> str | None:
    """The resolved ``normalign_config.json`` of a directory or repo; None when it has none, and also when
    the name is invalid or the repo unreachable (transformers then reports that itself)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    if os.path.isdir(source):
        recover(source)  # a save of this folder was interrupted: finish or clean it up before reading
    try:
        return cached_file(
            os.fspath(source),
            CONFIG_NAME,
            **_hub_kwargs(kwargs),
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            _raise_exceptions_for_gated_repo=False,
        )
    except (OSError, ValueError):
        return None


def _resolve_required(source: str, filename: str, kwargs: dict[str, Any]) -> str:
    try:
        path = cached_file(source, filename, **_hub_kwargs(kwargs))
    except OSError as err:
        path, reason = None, err
    else:
        reason = "no such file"
    if path is None:
        raise NormAlignCheckpointError(
            f"{source} holds {CONFIG_NAME} but {filename} could not be resolved: {reason}. The checkpoint is "
            "incomplete: re-save or re-upload it."
        ) from (reason if isinstance(reason, OSError) else None)
    return path


def read_checkpoint_info(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> CheckpointInfo:
    """Read ``normalign_config.json`` of a local directory or Hub repo (``revision=``, ``token=`` ...)."""
    source = os.fspath(pretrained_model_name_or_path)
    path = _find_config(source, hub_kwargs)
    if path is None:
        if not os.path.isdir(source):
            cached_file(source, "config.json", **_hub_kwargs(hub_kwargs))  # an unreachable repo: transformers' error
        raise NormAlignCheckpointError(
            f"{source} holds no {CONFIG_NAME}: it is not an hf-normalign checkpoint. To patch a plain model while "
            "loading it, use AutoNormAlignModelForImageTextToText.from_pretrained(..., normalign_config=...)."
        )
    return CheckpointInfo.from_file(path)


def _check_base(model: nn.Module, info: CheckpointInfo, source: str) -> None:
    try:
        found = _describe_model(model)
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
    """The file's SHA-256 against the one recorded in normalign_config.json (checkpoints of 0.1.0 record none)."""
    name = os.path.basename(path)
    expected = info.sha256.get(name)
    if expected is not None and _sha256(path) != expected:
        raise NormAlignCheckpointError(
            f"{path} does not match the SHA-256 recorded in {CONFIG_NAME} (damaged, truncated, or from another "
            "save): re-save the model, or re-download it (force_download=True)."
        )


def _read_tensors(path: str, info: CheckpointInfo) -> dict[str, torch.Tensor]:
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


def _check_before_building(source: str, info: CheckpointInfo, weights: str, kwargs: dict[str, Any]) -> None:
    """What can be checked without building the model: the base's config.json exists and matches, and the
    plugin weights have the recorded hidden size. A missing config.json would otherwise make transformers
    build a default-size (7B) model."""
    from transformers import AutoConfig

    config_path = _resolve_required(source, "config.json", kwargs)
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


def _check_state(path: str, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
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


def _attach(model: nn.Module, info: CheckpointInfo, source: str, weights: str, modules: str | None) -> None:
    """Patch a loaded base model with the checkpoint's config and load the plugin weights strictly."""
    base = _base_model(model)
    _check_base(base, info, source)
    already = get_plugin(base) is not None
    try:
        patch(base, info.config, init_weights=False)
    except ValueError as err:
        raise NormAlignCheckpointError(f"{source}: its {CONFIG_NAME} settings cannot be applied: {err}") from err
    plugin = get_plugin(base)
    try:
        tensors = _read_tensors(weights, info)
        _check_state(weights, tensors, plugin.state_dict(), f"the modules {CONFIG_NAME} describes ({info.config})")
        plugin.load_state_dict(tensors, strict=True)
        if modules is not None:
            _load_modules(base, info, modules)
    except BaseException:
        if not already:
            unpatch(base)  # leave a caller's `base_model` as it was
        raise


def _load_modules(base: nn.Module, info: CheckpointInfo, path: str) -> None:
    tensors = _read_tensors(path, info)
    claimed: set[str] = set()
    for module_path in info.modules_to_save:
        try:
            module = base.get_submodule(module_path)
        except AttributeError as err:
            raise NormAlignCheckpointError(
                f"{CONFIG_NAME} lists module {module_path!r} in modules_to_save, but {type(base).__name__} has no such "
                "module: the adapter belongs to another architecture."
            ) from err
        prefix = f"{module_path}."
        found = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        claimed.update(prefix + key for key in found)
        _check_state(path, found, module.state_dict(), module_path)
        module.load_state_dict(found, strict=True)
    stray = sorted(set(tensors) - claimed)
    if stray:
        raise NormAlignCheckpointError(
            f"{path} has unexpected keys {stray} outside modules_to_save {list(info.modules_to_save)} of {CONFIG_NAME}."
        )


def load_plugin_weights(
    model: nn.Module, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any
) -> nn.Module:
    """Load the plugin (and adapter-module) weights of a checkpoint into ``model``, strictly; patches it first
    if needed. Returns ``model``. For resuming from a checkpoint of an already loaded model::

        normalign.load_plugin_weights(model, "out/checkpoint-500")
    """
    source = os.fspath(pretrained_model_name_or_path)
    info = read_checkpoint_info(source, **hub_kwargs)
    weights = _resolve_required(source, WEIGHTS_NAME, hub_kwargs)
    modules = _resolve_required(source, MODULES_NAME, hub_kwargs) if info.modules_to_save else None
    _attach(model, info, source, weights, modules)
    return model


def _load_aligned(
    source: str,
    info: CheckpointInfo,
    load_base: Callable[..., nn.Module],
    model_args: tuple,
    kwargs: dict[str, Any],
    base_model: nn.Module | None = None,
) -> nn.Module:
    weights = _resolve_required(source, WEIGHTS_NAME, kwargs)
    modules = _resolve_required(source, MODULES_NAME, kwargs) if info.modules_to_save else None
    if info.adapter_only:
        if base_model is None:
            if not info.base_model_name_or_path:
                raise NormAlignCheckpointError(
                    f"The adapter at {source} names no base_model_name_or_path in {CONFIG_NAME}: pass base_model=..."
                )
            # revision / subfolder locate the adapter; the base has its own recorded revision.
            base_kwargs = {key: value for key, value in kwargs.items() if key not in ("revision", "subfolder")}
            if info.base_model_revision is not None:
                base_kwargs["revision"] = info.base_model_revision
            try:
                with _base_load():
                    base_model = load_base(info.base_model_name_or_path, *model_args, **base_kwargs)
            except OSError as err:
                raise NormAlignCheckpointError(
                    f"The adapter at {source} names the base model {info.base_model_name_or_path!r} in {CONFIG_NAME}, "
                    f"which cannot be loaded ({err}). Pass base_model=<the loaded base>, or correct "
                    f"base_model_name_or_path in {CONFIG_NAME}."
                ) from err
    elif base_model is not None:
        raise ValueError(f"base_model= applies to adapter-only checkpoints; {source} holds the full model weights.")
    else:
        _check_before_building(source, info, weights, kwargs)
        with _base_load():
            base_model = load_base(source, *model_args, **kwargs)
    # output_loading_info=True: transformers returns (model, loading_info); patch the model, keep the tuple.
    model = base_model[0] if isinstance(base_model, tuple) else base_model
    _attach(model, info, source, weights, modules)
    return base_model


def _transformers_class(name: str) -> type[PreTrainedModel]:
    import transformers

    cls = getattr(transformers, name, None)
    if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
        return cls
    # A user-registered family: reachable through the auto class it was registered with.
    return transformers.AutoModelForImageTextToText


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    *model_args: Any,
    base_model: nn.Module | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load an aligned checkpoint (directory or Hub repo id): the base model, patched, plugin weights loaded.

    ``kwargs`` go to transformers' ``from_pretrained`` (``dtype=``, ``device_map=``, ``quantization_config=``,
    ``revision=``, ``token=``, ``cache_dir=``, ``local_files_only=`` ...); the plugin modules stay fp32.
    For an adapter-only checkpoint the base is loaded from its ``base_model_name_or_path``, or is
    ``base_model`` (a loaded model, patched in place).

    Example:
        >>> model = normalign.from_pretrained("me/llava-1.5-7b-normalign", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> model = normalign.from_pretrained("me/adapter", base_model=base)                      # doctest: +SKIP
    """
    source = os.fspath(pretrained_model_name_or_path)
    info = read_checkpoint_info(source, **_hub_kwargs(kwargs))
    cls = _transformers_class(info.base_model_class)
    return _load_aligned(source, info, cls.from_pretrained, model_args, kwargs, base_model)


class AutoNormAlignModelForImageTextToText:
    """``AutoModelForImageTextToText`` that returns patched models.

    An aligned checkpoint (or adapter) loads as with ``normalign.from_pretrained``; a plain checkpoint is
    patched after loading when ``normalign_config`` is given (a ``NormAlignConfig``, its dict, or method
    names).

    Example:
        >>> model = AutoNormAlignModelForImageTextToText.from_pretrained(
        ...     "llava-hf/llava-1.5-7b-hf", normalign_config=["projector_norm", "moca"])  # doctest: +SKIP
    """

    def __init__(self) -> None:
        raise OSError(
            "AutoNormAlignModelForImageTextToText is not instantiated: use "
            "AutoNormAlignModelForImageTextToText.from_pretrained(path_or_repo_id, ...)."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        normalign_config: NormAlignConfig | dict | str | Sequence[str] | None = None,
        base_model: nn.Module | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        from transformers import AutoModelForImageTextToText

        source = os.fspath(pretrained_model_name_or_path)
        config_path = _find_config(source, kwargs)
        if config_path is not None:
            if normalign_config is not None:
                raise ValueError(
                    f"{source} is already an aligned checkpoint ({CONFIG_NAME}); drop normalign_config=, or load it "
                    "and call hf_normalign.unpatch(model) before patching it differently."
                )
            info = CheckpointInfo.from_file(config_path)
            return _load_aligned(
                source, info, AutoModelForImageTextToText.from_pretrained, model_args, kwargs, base_model
            )
        if normalign_config is None:
            raise ValueError(
                f"{source} holds no {CONFIG_NAME}. Pass normalign_config=NormAlignConfig(...) (or method names) to "
                "patch this plain model on load."
            )
        if base_model is not None:
            raise ValueError("base_model= applies to adapter-only checkpoints.")
        if isinstance(normalign_config, (str, list, tuple)):
            normalign_config = NormAlignConfig.from_methods(normalign_config)
        with _base_load():
            loaded = AutoModelForImageTextToText.from_pretrained(source, *model_args, **kwargs)
        patch(loaded[0] if isinstance(loaded, tuple) else loaded, normalign_config)  # output_loading_info=True
        return loaded


def _from_pretrained_wrapper(wrapped: Callable[..., Any], cls: type, args: tuple, kwargs: dict) -> Any:
    """Load-time patching for transformers' ``from_pretrained`` (family classes and auto classes)."""
    if _loading_base.get() or not autoload_enabled():
        return wrapped(*args, **kwargs)
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    config_path = _find_config(source, kwargs)
    if config_path is None:
        with _base_load():  # an auto class calls the family class: look up once
            return wrapped(*args, **kwargs)
    info = CheckpointInfo.from_file(config_path)
    if "pretrained_model_name_or_path" in kwargs:
        kwargs = dict(kwargs)
        del kwargs["pretrained_model_name_or_path"]
    return _load_aligned(os.fspath(source), info, wrapped, args[1:], kwargs)


# --- the wrappers (installed by hf_normalign._install, which forwards to them) ---------------------------------


def _push_wrapper(wrapped: Callable[..., Any], instance: PreTrainedModel, args: tuple, kwargs: dict) -> Any:
    """``model.push_to_hub`` of a patched model: the aligned files and the hf-normalign model card."""
    if get_plugin(instance) is None:
        return wrapped(*args, **kwargs)
    from .hub import push_to_hub

    arguments = inspect.signature(wrapped).bind(*args, **kwargs).arguments
    extra = arguments.pop("kwargs", {})
    if extra:
        raise TypeError(f"push_to_hub of a patched model: unexpected options {sorted(extra)}.")
    return push_to_hub(instance, **arguments)


def _resume_wrapper(wrapped: Callable[..., Any], trainer: Any, args: tuple, kwargs: dict) -> Any:
    """``Trainer._load_from_checkpoint``: the plugin is in ``normalign.safetensors``, not ``model.safetensors``."""
    result = wrapped(*args, **kwargs)
    arguments = inspect.signature(wrapped).bind(*args, **kwargs).arguments
    _restore_plugin(arguments.get("model") or trainer.model, arguments["resume_from_checkpoint"])
    return result


def _best_model_wrapper(wrapped: Callable[..., Any], trainer: Any, args: tuple, kwargs: dict) -> Any:
    """``Trainer._load_best_model`` (``load_best_model_at_end``): the same for the best checkpoint."""
    result = wrapped(*args, **kwargs)
    _restore_plugin(trainer.model, trainer.state.best_model_checkpoint)
    return result


def _restore_plugin(model: nn.Module, checkpoint: str | None) -> None:
    if checkpoint and get_plugin(model) is not None and os.path.isfile(os.path.join(checkpoint, WEIGHTS_NAME)):
        load_plugin_weights(model, checkpoint)


# --- command line: `normalign patch` (options in hf_normalign.cli) -------------------------------------------------


def _run_patch(args: argparse.Namespace) -> int:
    """``normalign patch`` (options in hf_normalign.cli): load, patch and save."""
    config = args.methods or args.config
    saved = _patch_and_save(args, config)
    print(f"Saved {saved} ({', '.join(config.methods)}) to {args.out}")
    return 0


def _patch_and_save(args: argparse.Namespace, config: NormAlignConfig) -> str:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)  # one of cli.DTYPES
    with autoload(False):
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, revision=args.revision)
    patch(model, config)
    if args.adapter_only:
        include = [entry.strip() for entry in args.include.split(",") if entry.strip()]
        save_pretrained(model, args.out, adapter_only=True, include=include, base_model_revision=args.revision)
        return "adapter"
    model.save_pretrained(args.out)
    try:  # a processor beside the weights makes the checkpoint usable on its own
        AutoProcessor.from_pretrained(args.model, revision=args.revision).save_pretrained(args.out)
    except (OSError, ValueError, TypeError, KeyError) as err:
        logger.warning(f"No processor saved to {args.out}: none loads from {args.model} ({err}).")
    return "aligned checkpoint"
