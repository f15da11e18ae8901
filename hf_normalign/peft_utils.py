"""Training the hf-normalign plugin together with PEFT adapters (LoRA / QLoRA).

The plugin lives in ``model.normalign`` and is applied by forward hooks that find it through a weak
reference, so it works unchanged inside a `PeftModel`, including `modules_to_save` copies of the
projector. Two PEFT defaults need handling:

- `get_peft_model` freezes every non-adapter parameter, the plugin's included: call
  `mark_plugin_trainable` afterwards.
- ``target_modules="all-linear"`` also puts LoRA on the PRe head's Linears: pass
  ``exclude_modules=plugin_lora_exclude_modules(model)``.

Do not list ``"normalign"`` in `modules_to_save`: PEFT would train and save a copy of the container
that the hooks never call, and `hf_normalign.is_patched` would return False.

Example:
    >>> from peft import LoraConfig, get_peft_model
    >>> import hf_normalign as normalign
    >>> model = normalign.patch(normalign.testing.tiny_model("llava"), methods=["projector_norm", "moca"])
    >>> peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    >>> peft_model = normalign.mark_plugin_trainable(peft_model)
    >>> all(p.requires_grad for p in peft_model.base_model.model.normalign.parameters())
    True

Save the adapter with ``peft_model.save_pretrained(dir)`` and the plugin with hf-normalign's own
weights file; PEFT does not save ``model.normalign``.
"""

from __future__ import annotations

from torch import nn

from .modeling import get_base_model
from .patching import ATTRIBUTE, get_plugin


def _require_plugin(model: nn.Module) -> nn.Module:
    plugin = get_plugin(model)
    if plugin is not None:
        return plugin
    if hasattr(get_base_model(model), ATTRIBUTE):
        raise ValueError(
            f"model.{ATTRIBUTE} has been replaced (PEFT `modules_to_save=[{ATTRIBUTE!r}]` wraps it in a copy "
            "the hooks never call, so the plugin would not train). Leave it out of `modules_to_save` and call "
            "hf_normalign.mark_plugin_trainable(peft_model) instead."
        )
    raise ValueError("This model is not patched by hf-normalign; call hf_normalign.patch(model, ...) first.")


def mark_plugin_trainable(model: nn.Module, trainable: bool = True) -> nn.Module:
    """Set ``requires_grad`` on every plugin parameter (after `peft.get_peft_model` froze them).

    Works on a `PeftModel` or a plain patched model; returns `model`. The plugin then shows up in
    ``peft_model.print_trainable_parameters()`` and in any optimizer built from the parameters with
    ``requires_grad``, the HF Trainer's included.

    Raises:
        ValueError: the model is not patched, the plugin was put in `modules_to_save`, or PEFT put
            LoRA layers inside the plugin (``target_modules="all-linear"`` without
            ``exclude_modules=plugin_lora_exclude_modules(model)``).

    Example:
        >>> peft_model = get_peft_model(patched_model, LoraConfig(target_modules=["q_proj", "v_proj"]))
        ... # doctest: +SKIP
        >>> normalign.mark_plugin_trainable(peft_model)  # doctest: +SKIP
    """
    plugin = _require_plugin(model)
    wrapped = sorted({name.rsplit(".base_layer", 1)[0] for name, _ in plugin.named_modules() if ".base_layer" in name})
    if wrapped:
        raise ValueError(
            f"PEFT put adapter layers on plugin modules {wrapped}; their weights would be frozen and saved under "
            "new names. Build the LoraConfig with exclude_modules=hf_normalign.plugin_lora_exclude_modules(model) "
            "(needed with target_modules='all-linear')."
        )
    plugin.requires_grad_(trainable)
    return model


def plugin_lora_exclude_modules(model: nn.Module) -> list[str]:
    """Names of the plugin's Linear modules, for ``LoraConfig(exclude_modules=...)``.

    PEFT matches a list entry against module names relative to the base model, exactly or as a
    ``.``-separated suffix. Call on the patched model before `get_peft_model`.

    Example:
        >>> model = normalign.patch(normalign.testing.tiny_model("llava"), methods=["pre"])  # doctest: +SKIP
        >>> normalign.plugin_lora_exclude_modules(model)  # doctest: +SKIP
        ['normalign.pre_head.fc1', 'normalign.pre_head.fc2']
        >>> LoraConfig(target_modules="all-linear", exclude_modules=normalign.plugin_lora_exclude_modules(model))
        ... # doctest: +SKIP
    """
    plugin = _require_plugin(model)
    return [f"{ATTRIBUTE}.{name}" for name, module in plugin.named_modules() if isinstance(module, nn.Linear)]
