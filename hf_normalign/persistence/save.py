"""Writing the hf-normalign files of a checkpoint, and :func:`save_pretrained` (aligned or adapter-only form).

The full form (:func:`save_aligned`, what a patched model's own ``save_pretrained`` runs): transformers' class
``save_pretrained`` writes the base, plugin detached, into a staging folder; the plugin files follow; the commit
moves them into place. :func:`save_unpatched` is an unpatched model's save over an aligned checkpoint.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging

from ..modeling import get_base_model
from ..patching import ATTRIBUTE, NormAlignModules, get_plugin
from .format import (
    BASE_CONFIG_NAME,
    CONFIG_NAME,
    MODULES_NAME,
    PLUGIN_FILES,
    WEIGHTS_NAME,
    file_sha256,
    is_base_weights,
)
from .info import CheckpointInfo, info_for
from .staging import atomic_directory, file_operation, writer_lock

logger = logging.get_logger(__name__)

T = TypeVar("T")


def _plugin_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Clones: safetensors refuses tensors that share storage, and the file must not alias live parameters.
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def write_files(
    directory: str,
    info: CheckpointInfo,
    plugin_state: dict[str, torch.Tensor],
    module_state: dict[str, torch.Tensor] | None = None,
) -> None:
    # One metadata key only: safetensors writes several in no fixed order, and identical saves should be
    # identical files (reproducible, and deduplicated on the Hub). The version lives in the config file.
    metadata = {"format": "pt"}
    files = {WEIGHTS_NAME: plugin_state, **({MODULES_NAME: module_state} if module_state else {})}
    _refuse_empty(files)
    hashes = {}
    for name, state in files.items():
        path = os.path.join(directory, name)
        file_operation("write", path)
        save_file(_plugin_tensors(state), path, metadata=metadata)
        hashes[name] = file_sha256(path)
    file_operation("write", os.path.join(directory, CONFIG_NAME))
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(json.dumps(dataclasses.replace(info, sha256=hashes).to_dict(), indent=2) + "\n")


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


def _saves_on_this_rank(model: nn.Module, is_main_process: bool) -> bool:
    check = getattr(model, "should_save_on_this_rank", None)  # newer transformers also check the rank
    return check(is_main_process) if check is not None else is_main_process


def save_aligned(model: nn.Module, save: Callable[..., Any], bound: inspect.BoundArguments) -> Any:
    """Save the patched transformers ``model`` as an aligned checkpoint; returns what ``save`` returns.

    ``save`` is transformers' own class ``save_pretrained`` bound to ``model`` and ``bound`` its arguments
    (``push_to_hub`` taken out: the caller pushes the finished folder). ``save`` writes the base, plugin detached,
    into a staging folder beside ``save_directory``; the plugin files and ``normalign_config.json`` follow; the commit
    replaces the folder's earlier base weights and plugin files (other files stay). A ``state_dict`` (the Trainer's,
    FSDP's gathered one) is split into base and plugin parts. Ranks that do not save only join ``save``'s
    collectives, plugin detached, and write nothing.
    """
    plugin = get_plugin(model)
    arguments = bound.arguments
    save_directory = os.fspath(arguments["save_directory"])
    plugin_state = plugin.state_dict()
    state_dict = arguments.get("state_dict")
    if state_dict is not None:
        prefix = f"{ATTRIBUTE}."
        given = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        plugin_state = given or plugin_state
        arguments["state_dict"] = {key: value for key, value in state_dict.items() if not key.startswith(prefix)}
    if not _saves_on_this_rank(model, arguments.get("is_main_process", True)):
        with _plugin_detached(model):
            return save(*bound.args, **bound.kwargs)

    info = info_for(model, plugin, adapter_only=False, base_model_name_or_path=model.name_or_path)
    variant = arguments.get("variant")
    peft = getattr(model, "_hf_peft_config_loaded", False)

    def replaces(entry: str) -> bool:  # the earlier save's plugin and weights files that this save does not write
        return entry in PLUGIN_FILES or is_base_weights(entry, variant, peft=peft)

    with atomic_directory(save_directory, replaces) as staging:
        arguments["save_directory"] = staging
        with _plugin_detached(model):
            result = save(*bound.args, **bound.kwargs)
        write_files(staging, info, plugin_state)
    return result


def save_unpatched(save_directory: str | os.PathLike, save: Callable[[], T]) -> T:
    """``save()``, an unpatched model's transformers save into ``save_directory``, which holds an aligned checkpoint:
    under the folder's writer lock (not while one of our saves runs there), then without the folder's hf-normalign
    files, which belong to the earlier weights (a load would attach that old plugin to these weights)."""
    directory = os.fspath(save_directory)
    with writer_lock(directory):
        result = save()
        stale = [name for name in sorted(PLUGIN_FILES) if os.path.isfile(os.path.join(directory, name))]
        if stale:
            logger.warning(
                f"{directory} held hf-normalign files {stale} from an earlier save; this model is not patched, so "
                "they were removed (they would re-apply an old intervention on load)."
            )
        for name in stale:
            os.remove(os.path.join(directory, name))
    return result


def _refuse_empty(files: dict[str, dict[str, torch.Tensor]]) -> None:
    """DeepSpeed ZeRO-3 leaves empty placeholders in the modules outside a forward; without a gathered state dict
    (the Trainer passes none when ``stage3_gather_16bit_weights_on_model_save`` is false) they would be written as
    0-element weights: a checkpoint that looks aligned and is not."""
    empty = sorted(
        f"{name}: {key}" for name, state in files.items() for key, value in state.items() if not value.numel()
    )
    if empty:
        raise ValueError(
            f"cannot save the hf-normalign weights: {empty[:3]} ... are empty, as DeepSpeed ZeRO-3 leaves partitioned "
            "parameters outside a forward. Let the save gather them: accelerate `zero3_save_16bit_model: true` "
            "(DeepSpeed config `stage3_gather_16bit_weights_on_model_save: true`), as "
            "hf_normalign/recipes/accelerate/deepspeed_zero3.yaml sets."
        )


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
    base = get_base_model(model)
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
    info = info_for(
        base,
        plugin,
        adapter_only=True,
        base_model_name_or_path=name,
        base_model_revision=base_model_revision,
        modules_to_save=paths,
    )
    with atomic_directory(save_directory, replaces=lambda entry: entry in PLUGIN_FILES) as staging:
        _refuse_full_checkpoint(save_directory)
        write_files(staging, info, plugin.state_dict(), module_state)
    return os.fspath(save_directory)


def _refuse_full_checkpoint(directory: str | os.PathLike) -> None:
    """An adapter saved over a full (fine-tuned) checkpoint would load as the adapter on the original base, the
    folder's own weights ignored: the fine-tune would silently lose its meaning."""
    target = os.path.realpath(os.fspath(directory))
    entries = sorted(os.listdir(target)) if os.path.isdir(target) else []
    base = [entry for entry in entries if entry == BASE_CONFIG_NAME or is_base_weights(entry)]
    if base:
        raise ValueError(
            f"{target} holds a full model checkpoint ({', '.join(base)}): an adapter-only save there would make it "
            "load as the adapter on the original base model, with these weights ignored. Save the adapter into "
            "another folder, or delete those files first if that checkpoint is no longer wanted."
        )


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
