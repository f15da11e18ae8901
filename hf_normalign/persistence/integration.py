"""The transformers integration: the wrappers ``hf_normalign._install`` puts on ``save_pretrained``,
``from_pretrained``, ``push_to_hub`` and the Trainer's checkpoint loading (resume, ``load_best_model_at_end``).

Imported only when a wrapper first runs (``_install`` names the functions here), never by
``hf_normalign.persistence`` itself.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from accelerate.utils.constants import FSDP_MODEL_NAME
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from ..hub import push_to_hub
from ..modeling import get_base_model
from ..patching import ATTRIBUTE, get_plugin
from .format import (
    CONFIG_NAME,
    PLUGIN_FILES,
    WEIGHTS_NAME,
    NormAlignCheckpointError,
    info_for,
    is_base_weights,
)
from .load import find_config, load_aligned, load_plugin_weights
from .save import write_files
from .staging import atomic_directory, writer_lock
from .switch import autoload_enabled, base_load, loading_base

logger = logging.get_logger(__name__)


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


def save_wrapper(wrapped: Callable[..., Any], instance: PreTrainedModel, args: tuple, kwargs: dict) -> Any:
    base = get_base_model(instance)
    plugin = get_plugin(base)
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    arguments = bound.arguments
    save_directory = os.fspath(arguments["save_directory"])
    is_main_process = arguments.get("is_main_process", True)
    if plugin is None:
        if not (is_main_process and os.path.isfile(os.path.join(save_directory, CONFIG_NAME))):
            return wrapped(*args, **kwargs)
        with writer_lock(save_directory):  # over an aligned checkpoint: not while one of our saves runs
            result = wrapped(*args, **kwargs)
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

    info = info_for(base, plugin, adapter_only=False, base_model_name_or_path=instance.name_or_path)
    variant = arguments.get("variant")
    peft = getattr(instance, "_hf_peft_config_loaded", False)

    def replaces(entry: str) -> bool:  # the earlier save's plugin and weights files that this save does not write
        return entry in PLUGIN_FILES or is_base_weights(entry, variant, peft=peft)

    with atomic_directory(save_directory, replaces) as staging:
        arguments["save_directory"] = staging
        with _plugin_detached(base):
            result = wrapped(*bound.args, **bound.kwargs)
        write_files(staging, info, plugin_state)
    if push:
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
    stale = [name for name in sorted(PLUGIN_FILES) if os.path.isfile(os.path.join(directory, name))]
    if stale:
        logger.warning(
            f"{directory} held hf-normalign files {stale} from an earlier save; this model is not patched, so they "
            "were removed (they would re-apply an old intervention on load)."
        )
        for name in stale:
            os.remove(os.path.join(directory, name))


def from_pretrained_wrapper(wrapped: Callable[..., Any], cls: type, args: tuple, kwargs: dict) -> Any:
    """Load-time patching for transformers' ``from_pretrained`` (family classes and auto classes)."""
    if loading_base() or not autoload_enabled():
        return wrapped(*args, **kwargs)
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    config_path = find_config(source, kwargs)
    if config_path is None:
        with base_load():  # an auto class calls the family class: look up once
            return wrapped(*args, **kwargs)
    if "pretrained_model_name_or_path" in kwargs:
        kwargs = dict(kwargs)
        del kwargs["pretrained_model_name_or_path"]
    return load_aligned(os.fspath(source), config_path, wrapped, args[1:], kwargs)


def push_wrapper(wrapped: Callable[..., Any], instance: PreTrainedModel, args: tuple, kwargs: dict) -> Any:
    """``model.push_to_hub`` of a patched model: the aligned files and the hf-normalign model card."""
    if get_plugin(instance) is None:
        return wrapped(*args, **kwargs)
    arguments = inspect.signature(wrapped).bind(*args, **kwargs).arguments
    extra = arguments.pop("kwargs", {})
    if extra:
        raise TypeError(f"push_to_hub of a patched model: unexpected options {sorted(extra)}.")
    return push_to_hub(instance, **arguments)


RESUME_WITHOUT_PLUGIN_ENV = "HF_NORMALIGN_RESUME_WITHOUT_PLUGIN"


def resume_wrapper(wrapped: Callable[..., Any], trainer: Any, args: tuple, kwargs: dict) -> Any:
    """``Trainer._load_from_checkpoint``: the plugin is in ``normalign.safetensors``, not ``model.safetensors``.

    A checkpoint without that file is refused before anything is loaded (the run would go on with the plugin
    as it is now, e.g. freshly initialised), unless ``HF_NORMALIGN_RESUME_WITHOUT_PLUGIN=1`` says so on purpose.
    """
    arguments = inspect.signature(wrapped).bind(*args, **kwargs).arguments
    model, checkpoint = arguments.get("model") or trainer.model, arguments["resume_from_checkpoint"]
    _require_plugin_file(model, checkpoint, "resume from")
    result = wrapped(*args, **kwargs)
    _restore_plugin(model, checkpoint)
    return result


def best_model_wrapper(wrapped: Callable[..., Any], trainer: Any, args: tuple, kwargs: dict) -> Any:
    """``Trainer._load_best_model`` (``load_best_model_at_end``): the same for the best checkpoint."""
    _require_plugin_file(trainer.model, trainer.state.best_model_checkpoint, "load the best model from")
    result = wrapped(*args, **kwargs)
    _restore_plugin(trainer.model, trainer.state.best_model_checkpoint)
    return result


def _require_plugin_file(model: nn.Module, checkpoint: str | None, action: str) -> None:
    """Refuse a Trainer checkpoint of a patched model that lacks the plugin weights (the opt-out is logged)."""
    if not checkpoint or get_plugin(model) is None or os.path.isfile(os.path.join(checkpoint, WEIGHTS_NAME)):
        return
    if any(name.startswith(FSDP_MODEL_NAME) for name in os.listdir(checkpoint)):
        return  # an FSDP checkpoint holds the whole module tree, plugin included, and loads it as such
    env = os.environ.get(RESUME_WITHOUT_PLUGIN_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        logger.warning(
            f"{checkpoint} has no {WEIGHTS_NAME}; {RESUME_WITHOUT_PLUGIN_ENV}={env}: going on with the hf-normalign "
            "plugin weights the model has now."
        )
        return
    raise NormAlignCheckpointError(
        f"Cannot {action} {checkpoint}: the model is patched by hf-normalign but the checkpoint has no "
        f"{WEIGHTS_NAME}, so the plugin would silently restart from the weights it has now (its initialisation "
        f"for a fresh model). Restore the file from a copy of the checkpoint, or, to go on without it on purpose, "
        f"set {RESUME_WITHOUT_PLUGIN_ENV}=1. (PEFT checkpoints hold only the adapter unless the plugin is saved "
        "beside it: hf_normalign.integrations.trl.trl_kwargs or NormAlignCallback do that.)"
    )


def _restore_plugin(model: nn.Module, checkpoint: str | None) -> None:
    if checkpoint and get_plugin(model) is not None and os.path.isfile(os.path.join(checkpoint, WEIGHTS_NAME)):
        load_plugin_weights(model, checkpoint)
