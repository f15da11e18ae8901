"""PEFT checkpoints hold the adapter only: make a PEFT model's ``save_pretrained`` write the plugin files too."""

from __future__ import annotations

import functools
import os
from typing import Any

from torch import nn

from ..modeling import get_base_model
from ..persistence import save_pretrained

__all__ = ["save_plugin_with_adapter"]


def save_plugin_with_adapter(peft_model: nn.Module) -> None:
    """Make ``peft_model.save_pretrained`` (the Trainer's ``save_model()`` and every ``checkpoint-N``) also write
    ``normalign_config.json`` + ``normalign.safetensors`` (hf-normalign's adapter form), which the Trainer's
    resume, wrapped by hf-normalign, loads back. Idempotent; patches the instance only.

    Example:
        >>> save_plugin_with_adapter(get_peft_model(patched_model, lora_config))  # doctest: +SKIP
    """
    original = peft_model.save_pretrained
    if getattr(original, "_normalign_saves_plugin", False):
        return

    @functools.wraps(original)
    def save_with_plugin(save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        result = original(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            name = get_base_model(peft_model).name_or_path or os.fspath(save_directory)
            save_pretrained(peft_model, save_directory, adapter_only=True, include=(), base_model_name_or_path=name)
        return result

    save_with_plugin._normalign_saves_plugin = True  # type: ignore[attr-defined]
    peft_model.save_pretrained = save_with_plugin
