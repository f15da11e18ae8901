"""Loading aligned checkpoints: :func:`read_checkpoint_info`, :func:`from_pretrained`,
:func:`load_plugin_weights` and :class:`AutoNormAlignModelForImageTextToText`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.utils.hub import cached_file

from ..config import NormAlignConfig
from ..convert.detect import original_llava_hint
from ..modeling import get_base_model
from ..patching import get_plugin, patch, unpatch
from .checks import check_base, check_before_building, check_state, read_tensors
from .format import CONFIG_NAME, MODULES_NAME, WEIGHTS_NAME, NormAlignCheckpointError
from .info import CheckpointInfo
from .staging import read_consistently, wait_for_writers
from .switch import base_load

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}


def find_config(source: Any, kwargs: dict[str, Any]) -> str | None:
    """The resolved ``normalign_config.json`` of a directory or repo; None when it has none, and also when
    the name is invalid or the repo unreachable (transformers then reports that itself)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
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


def resolve_required(source: str, filename: str, kwargs: dict[str, Any]) -> str:
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


def require_config(source: str, hub_kwargs: dict[str, Any]) -> str:
    """The resolved ``normalign_config.json`` of ``source``, or a clear error (transformers' own for a bad repo)."""
    path = find_config(source, hub_kwargs)
    if path is None:
        if not os.path.isdir(source):
            cached_file(source, "config.json", **_hub_kwargs(hub_kwargs))  # an unreachable repo: transformers' error
        hint = original_llava_hint(source)
        if hint is not None:
            raise NormAlignCheckpointError(hint)
        raise NormAlignCheckpointError(
            f"{source} holds no {CONFIG_NAME}: it is not an hf-normalign checkpoint. To patch a plain model while "
            "loading it, use AutoNormAlignModelForImageTextToText.from_pretrained(..., normalign_config=...)."
        )
    return path


def read_checkpoint_info(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> CheckpointInfo:
    """Read ``normalign_config.json`` of a local directory or Hub repo (``revision=``, ``token=`` ...).

    Reads only: waits for a save into the folder that is rolling forward, and refuses a folder whose save was
    interrupted after its commit (finish it with ``hf_normalign.persistence.recover``)."""
    path = require_config(os.fspath(pretrained_model_name_or_path), hub_kwargs)
    wait_for_writers(os.path.dirname(path))
    return CheckpointInfo.from_file(path)


def _attach(model: nn.Module, info: CheckpointInfo, source: str, weights: str, modules: str | None) -> None:
    """Patch a loaded base model with the checkpoint's config and load the plugin weights strictly."""
    base = get_base_model(model)
    check_base(base, info, source)
    already = get_plugin(base) is not None
    try:
        patch(base, info.config, init_weights=False)
    except ValueError as err:
        raise NormAlignCheckpointError(f"{source}: its {CONFIG_NAME} settings cannot be applied: {err}") from err
    plugin = get_plugin(base)
    try:
        tensors = read_tensors(weights, info)
        check_state(weights, tensors, plugin.state_dict(), f"the modules {CONFIG_NAME} describes ({info.config})")
        plugin.load_state_dict(tensors, strict=True)
        if modules is not None:
            _load_modules(base, info, modules)
    except BaseException:
        if not already:
            unpatch(base)  # leave a caller's `base_model` as it was
        raise


def _load_modules(base: nn.Module, info: CheckpointInfo, path: str) -> None:
    tensors = read_tensors(path, info)
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
        check_state(path, found, module.state_dict(), module_path)
        module.load_state_dict(found, strict=True)
    stray = sorted(set(tensors) - claimed)
    if stray:
        raise NormAlignCheckpointError(
            f"{path} has unexpected keys {stray} outside modules_to_save {list(info.modules_to_save)} of {CONFIG_NAME}."
        )


def _undo_patch(model: nn.Module) -> Callable[[], None]:
    """Before a repeated read: take off the patch an earlier attempt put on a caller's ``model``."""
    base = get_base_model(model)
    patched = get_plugin(base) is not None

    def undo() -> None:
        if not patched and get_plugin(base) is not None:
            unpatch(base)

    return undo


def load_plugin_weights(
    model: nn.Module, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any
) -> nn.Module:
    """Load the plugin (and adapter-module) weights of a checkpoint into ``model``, strictly; patches it first
    if needed. Returns ``model``. For resuming from a checkpoint of an already loaded model::

        normalign.load_plugin_weights(model, "out/checkpoint-500")
    """
    source = os.fspath(pretrained_model_name_or_path)
    config_path = require_config(source, hub_kwargs)

    def load() -> None:
        info = CheckpointInfo.from_file(config_path)
        weights = resolve_required(source, WEIGHTS_NAME, hub_kwargs)
        modules = resolve_required(source, MODULES_NAME, hub_kwargs) if info.modules_to_save else None
        _attach(model, info, source, weights, modules)

    read_consistently(os.path.dirname(config_path), load, undo=_undo_patch(model))
    return model


def load_aligned(
    source: str,
    config_path: str,
    load_base: Callable[..., nn.Module] | None,
    model_args: tuple,
    kwargs: dict[str, Any],
    base_model: nn.Module | None = None,
) -> nn.Module:
    """Load the aligned checkpoint whose ``normalign_config.json`` is ``config_path`` with ``load_base`` (a
    ``from_pretrained``; None: that of the class the checkpoint records), from one complete save of the folder."""

    def load() -> nn.Module:
        info = CheckpointInfo.from_file(config_path)
        loader = load_base or _transformers_class(info, config_path).from_pretrained
        return _load_aligned(source, info, loader, model_args, kwargs, base_model)

    undo = _undo_patch(base_model) if base_model is not None else None
    return read_consistently(os.path.dirname(config_path), load, undo=undo)


def _load_aligned(
    source: str,
    info: CheckpointInfo,
    load_base: Callable[..., nn.Module],
    model_args: tuple,
    kwargs: dict[str, Any],
    base_model: nn.Module | None,
) -> nn.Module:
    weights = resolve_required(source, WEIGHTS_NAME, kwargs)
    modules = resolve_required(source, MODULES_NAME, kwargs) if info.modules_to_save else None
    if info.adapter_only:
        if base_model is None:
            base_model = _load_adapter_base(source, info, load_base, model_args, kwargs)
    elif base_model is not None:
        raise ValueError(f"base_model= applies to adapter-only checkpoints; {source} holds the full model weights.")
    else:
        check_before_building(source, info, resolve_required(source, "config.json", kwargs), weights)
        with base_load():
            base_model = load_base(source, *model_args, **kwargs)
    # output_loading_info=True: transformers returns (model, loading_info); patch the model, keep the tuple.
    model = base_model[0] if isinstance(base_model, tuple) else base_model
    _attach(model, info, source, weights, modules)
    return base_model


def _load_adapter_base(
    source: str, info: CheckpointInfo, load_base: Callable[..., nn.Module], model_args: tuple, kwargs: dict[str, Any]
) -> nn.Module:
    """The base an adapter records, after checking (from its config alone) that it is of the adapter's family."""
    from transformers import AutoConfig

    name = info.base_model_name_or_path
    if not name:
        raise NormAlignCheckpointError(
            f"The adapter at {source} names no base_model_name_or_path in {CONFIG_NAME}: pass base_model=..."
        )
    # revision / subfolder locate the adapter; the base has its own recorded revision.
    base_kwargs = {key: value for key, value in kwargs.items() if key not in ("revision", "subfolder")}
    if info.base_model_revision is not None:
        base_kwargs["revision"] = info.base_model_revision

    def unloadable(err: Exception) -> NormAlignCheckpointError:
        return NormAlignCheckpointError(
            f"The adapter at {source} names the base model {name!r} in {CONFIG_NAME}, which cannot be loaded ({err}). "
            f"Pass base_model=<the loaded base>, or correct base_model_name_or_path in {CONFIG_NAME}."
        )

    try:
        model_type = AutoConfig.from_pretrained(name, **_hub_kwargs(base_kwargs)).model_type
    except (OSError, ValueError) as err:
        raise unloadable(err) from err
    if model_type != info.base_model_type:
        raise NormAlignCheckpointError(
            f"The adapter at {source} was made for a {info.base_model_type!r} model ({info.describe_base()}), but "
            f"its base_model_name_or_path {name!r} is a {model_type!r} model. Correct base_model_name_or_path in "
            f"{CONFIG_NAME}, or pass base_model=<a loaded {info.base_model_type} model>."
        )
    try:
        with base_load():
            return load_base(name, *model_args, **base_kwargs)
    except OSError as err:
        raise unloadable(err) from err


def _transformers_class(info: CheckpointInfo, source: str) -> type[PreTrainedModel]:
    """The class ``base_model_class`` names: a transformers model class of ``base_model_type``, or (a name
    transformers does not have) the auto class a user-registered family is reachable through."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    cls = getattr(transformers, info.base_model_class, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        return transformers.AutoModelForImageTextToText
    if getattr(cls.config_class, "model_type", None) != info.base_model_type:
        allowed = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(info.base_model_type)
        raise NormAlignCheckpointError(
            f"{source}: base_model_class {info.base_model_class!r} is not a model class of base_model_type "
            f"{info.base_model_type!r} (allowed: {allowed!r}, or the class a registered family was saved from). "
            "The file was edited: correct it or re-save the model."
        )
    return cls


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
    return load_aligned(source, require_config(source, kwargs), None, model_args, kwargs, base_model)


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
        config_path = find_config(source, kwargs)
        if config_path is not None:
            if normalign_config is not None:
                raise ValueError(
                    f"{source} is already an aligned checkpoint ({CONFIG_NAME}); drop normalign_config=, or load it "
                    "and call hf_normalign.unpatch(model) before patching it differently."
                )
            return load_aligned(
                source, config_path, AutoModelForImageTextToText.from_pretrained, model_args, kwargs, base_model
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
        with base_load():
            loaded = AutoModelForImageTextToText.from_pretrained(source, *model_args, **kwargs)
        patch(loaded[0] if isinstance(loaded, tuple) else loaded, normalign_config)  # output_loading_info=True
        return loaded
