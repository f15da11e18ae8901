"""bitsandbytes 4-bit / 8-bit loading and QLoRA preparation for patched VLMs.

QLoRA recipe (vision tower and projector stay unquantised, plugin trains in fp32 next to LoRA)::

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from peft import LoraConfig, get_peft_model
    import hf_normalign as normalign

    config = AutoConfig.from_pretrained(repo)
    model = AutoModelForImageTextToText.from_pretrained(
        repo, quantization_config=normalign.bnb_config(4, config), dtype=torch.bfloat16)
    normalign.patch(model, methods=["projector_norm", "moca", "pre"])
    model = normalign.prepare_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    normalign.mark_plugin_trainable(model)

Two transformers 5.x facts shape this module (see `transformers.quantizers.quantizers_utils
.should_convert_module`): a module is left unquantised when a skip entry matches its full path as a
regex from the start up to a module boundary, or as a plain string suffix; and passing
`llm_int8_skip_modules` *replaces* the default skip list (`lm_head`). A bare
``"multi_modal_projector"`` therefore names the container only, while its Linears
(``model.multi_modal_projector.linear_1``) match neither rule and are quantised, and ``lm_head``
gets quantised too. The entries built here are full paths from the `...ForConditionalGeneration`,
which match every child on a boundary.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from .patching import get_plugin
from .registry import ArchitectureSpec, get_spec, supported_architectures


def _spec_paths(spec: ArchitectureSpec) -> list[str]:
    return [spec.lm_head, spec.vision_tower, spec.projector, *spec.extra_projectors]


def quantization_skip_modules(model_or_config: Any = None) -> list[str]:
    """Module paths to pass as ``BitsAndBytesConfig(llm_int8_skip_modules=...)``.

    Keeps ``lm_head``, the vision tower, the projector and any extra projectors (Qwen3-VL's deepstack
    mergers) unquantised; the language model's Linears are quantised. Paths are full module paths
    from the `...ForConditionalGeneration` (load with `AutoModelForImageTextToText` or the family's
    `...ForConditionalGeneration` class), and match their children under transformers' boundary rule.

    Args:
        model_or_config: a supported model, its config, or a Hub id / local path (its config is read).
            ``None`` gives the union over every registered architecture: safe for any supported family
            because paths that a model lacks match nothing.

    Example:
        >>> from hf_normalign.testing import tiny_config
        >>> quantization_skip_modules(tiny_config("llava"))
        ['lm_head', 'model.vision_tower', 'model.multi_modal_projector']
        >>> quantization_skip_modules(tiny_config("qwen2_vl"))
        ['lm_head', 'model.visual', 'model.visual.merger']
    """
    if model_or_config is None:
        specs = [get_spec(SimpleNamespace(model_type=name)) for name in supported_architectures()]
    else:
        if isinstance(model_or_config, str | os.PathLike):
            from transformers import AutoConfig

            model_or_config = AutoConfig.from_pretrained(model_or_config)
        specs = [get_spec(model_or_config)]
    # dict keeps first-seen order and drops duplicates (several families share a layout)
    return list(dict.fromkeys(path for spec in specs for path in _spec_paths(spec)))


def bnb_config(
    bits: int = 4,
    model_or_config: Any = None,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_type: str = "nf4",
    double_quant: bool = True,
    **kwargs: Any,
) -> BitsAndBytesConfig:
    """A `BitsAndBytesConfig` that quantises only the language model.

    Args:
        bits: 4 (QLoRA: ``quant_type`` nf4 by default, double quantisation) or 8 (LLM.int8()).
        model_or_config: what `quantization_skip_modules` accepts; ``None`` covers every supported family.
        compute_dtype: 4-bit matmul dtype (``bnb_4bit_compute_dtype``); unused for 8 bits.
        quant_type, double_quant: ``bnb_4bit_quant_type`` / ``bnb_4bit_use_double_quant``; unused for 8 bits.
        kwargs: any other `BitsAndBytesConfig` argument. ``llm_int8_skip_modules`` given here is
            *added* to the computed list rather than replacing it.

    Example:
        >>> from hf_normalign.testing import tiny_config
        >>> cfg = bnb_config(4, tiny_config("llava"))
        >>> cfg.bnb_4bit_quant_type, cfg.llm_int8_skip_modules
        ('nf4', ['lm_head', 'model.vision_tower', 'model.multi_modal_projector'])
    """
    skip = quantization_skip_modules(model_or_config)
    skip += [name for name in kwargs.pop("llm_int8_skip_modules", None) or () if name not in skip]
    if bits == 4:
        bits_kwargs = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_compute_dtype": compute_dtype,
            "bnb_4bit_use_double_quant": double_quant,
        }
    elif bits == 8:
        bits_kwargs = {"load_in_8bit": True}
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    return BitsAndBytesConfig(**{**bits_kwargs, **kwargs, "llm_int8_skip_modules": skip})


def prepare_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True, **kwargs: Any) -> nn.Module:
    """`peft.prepare_model_for_kbit_training` that leaves the hf-normalign plugin trainable, in fp32.

    PEFT's function freezes every parameter and casts fp16/bf16 ones to fp32 (the whole unquantised
    vision tower and projector included). Afterwards this re-enables ``requires_grad`` on the plugin
    parameters under ``model.normalign`` and casts them to fp32 (they are fp32 unless the model was
    cast after patching). Call it on the patched, quantised model *before* `peft.get_peft_model`,
    then call `hf_normalign.mark_plugin_trainable` on the PEFT model. An unpatched model is prepared
    exactly as PEFT does; patching it afterwards adds trainable fp32 plugin modules.

    Args:
        model: a quantised (patched) `...ForConditionalGeneration`, not a PEFT model.
        use_gradient_checkpointing, kwargs: passed to `peft.prepare_model_for_kbit_training`
            (``gradient_checkpointing_kwargs``, ``auto_clear_cache``).

    Example:
        >>> model = normalign.patch(quantised_model, methods=["projector_norm", "moca"])  # doctest: +SKIP
        >>> model = normalign.prepare_for_kbit_training(model)  # doctest: +SKIP
    """
    from peft import prepare_model_for_kbit_training

    if hasattr(model, "peft_config"):
        # PEFT's function would freeze the LoRA weights of an already-wrapped model as well.
        raise ValueError(
            "prepare_for_kbit_training expects the base model; call it before peft.get_peft_model, "
            "then call hf_normalign.mark_plugin_trainable(peft_model)."
        )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=use_gradient_checkpointing, **kwargs)
    plugin = get_plugin(model)
    if plugin is not None:
        plugin.float().requires_grad_(True)
    return model
