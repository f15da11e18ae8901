"""Recognising an original-format LLaVA checkpoint (the training repository's ``LlavaLlamaForCausalLM``) from its
``config.json`` alone, so that loaders can say "convert it first" instead of failing on an unknown model type.
"""

from __future__ import annotations

import json
import os
from typing import Any

ORIGINAL_MODEL_TYPES = ("llava_llama",)
ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM",)


def is_original_llava(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` dict is the LLaVA training repository's format (not transformers' ``llava``)."""
    return config.get("model_type") in ORIGINAL_MODEL_TYPES or any(
        name in ORIGINAL_ARCHITECTURES for name in config.get("architectures") or ()
    )


def original_llava_hint(source: str | os.PathLike) -> str | None:
    """For a local folder in the original LLaVA format: the sentence telling how to convert it; else None.

    Only local folders are read (a Hub id would cost a download just to improve an error message).
    """
    path = os.path.join(os.fspath(source), "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict) or not is_original_llava(config):
        return None
    moca = " with MoCa" if config.get("use_moca") else ""
    return (
        f"{source} is an original-format LLaVA checkpoint{moca} (LlavaLlamaForCausalLM of the LLaVA training "
        f"repository), which transformers cannot load: convert it first with `normalign convert {source} OUT` "
        "(add --vision-tower ID_OR_PATH if its mm_vision_tower is not reachable), then load OUT."
    )
