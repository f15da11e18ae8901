"""Model-level helpers shared by patching, persistence, PEFT/TRL integration and diagnostics."""

from __future__ import annotations

from torch import nn


def get_base_model(model: nn.Module) -> nn.Module:
    """The ``...ForConditionalGeneration`` under a ``torch.compile`` and/or PEFT wrapper (or ``model`` itself).

    hf-normalign keeps its plugin modules and hooks on that model, so every entry point that accepts a
    wrapped model unwraps it with this first.

    Example:
        >>> import hf_normalign as normalign
        >>> from hf_normalign.modeling import get_base_model
        >>> model = normalign.testing.tiny_model("llava")
        >>> get_base_model(model) is model
        True
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    get_base = getattr(model, "get_base_model", None)  # PEFT's PeftModel
    return get_base() if callable(get_base) else model
