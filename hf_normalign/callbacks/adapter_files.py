"""PEFT checkpoints hold the adapter only: make a PEFT model's ``save_pretrained`` write the plugin files too.

The one place that writes hf-normalign's adapter files beside a PEFT adapter: ``NormAlignCallback``, the TRL
integration and the recipes all go through :func:`save_plugin_with_adapter`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..modeling import get_base_model
from ..persistence import save_pretrained

__all__ = ["save_plugin_with_adapter"]


def save_plugin_with_adapter(
    peft_model: nn.Module, *, include: Sequence[str] = (), base_model_name_or_path: str | None = None
) -> None:
    """Make ``peft_model.save_pretrained`` (the Trainer's ``save_model()`` and every ``checkpoint-N``) also write
    ``normalign_config.json`` + ``normalign.safetensors`` (hf-normalign's adapter form), which the Trainer's
    resume, wrapped by hf-normalign, loads back. Patches the instance only.

    Args:
        include: modules saved with the plugin (``normalign_modules.safetensors``), as in
            ``normalign.save_pretrained(..., adapter_only=True, include=...)``; default: the plugin alone.
            ``("projector",)`` adds the projector(s), which the recipes train beside the adapter.
        base_model_name_or_path: the base recorded for loading; default: the base model's ``name_or_path``
            (the save directory when it has none).

    The first call's options hold: a later call on the same model (``NormAlignCallback`` makes one when training
    begins) changes nothing.

    Example:
        >>> save_plugin_with_adapter(get_peft_model(patched_model, lora_config))  # doctest: +SKIP
        >>> save_plugin_with_adapter(peft_model, include=("projector",), base_model_name_or_path="/abs/base")
        ... # doctest: +SKIP
    """
    original = peft_model.save_pretrained
    if getattr(original, "_normalign_saves_plugin", False):
        return
    if isinstance(include, str):  # tuple("projector") would be its letters
        raise TypeError(f"include takes a sequence of module names, e.g. ({include!r},), got the string {include!r}")
    include = tuple(include)

    @functools.wraps(original)
    def save_with_plugin(save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        result = original(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            name = base_model_name_or_path or get_base_model(peft_model).name_or_path or os.fspath(save_directory)
            save_pretrained(
                peft_model, save_directory, adapter_only=True, include=include, base_model_name_or_path=name
            )
        return result

    save_with_plugin._normalign_saves_plugin = True  # type: ignore[attr-defined]
    peft_model.save_pretrained = save_with_plugin
