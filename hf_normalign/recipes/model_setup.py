"""The recipe's model: built from a ``build:`` section, loaded (4-bit for QLoRA), patched, and set up per stage
(what trains; LoRA / QLoRA, whose checkpoints get the plugin and projector beside the adapter).

Usage::

    from hf_normalign.recipes.model_setup import build_base, load_model, load_processor, setup_stage
    build_base(config)                                  # the build: section's model, once, into its save_dir
    model = setup_stage(load_model(config), config)     # patched, frozen per stage, PEFT-wrapped for LoRA
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.utils import logging

import hf_normalign as normalign
from hf_normalign import build
from hf_normalign.callbacks.adapter_files import save_plugin_with_adapter
from hf_normalign.model_view import ModelView
from hf_normalign.patching import get_plugin
from hf_normalign.peft_utils import mark_plugin_trainable
from hf_normalign.quantization import bnb_config, prepare_for_kbit_training
from hf_normalign.recipes.arguments import DTYPE_NAMES, ModelArguments
from hf_normalign.recipes.config import ConfigError, RecipeConfig

__all__ = ["DTYPES", "build_base", "load_model", "load_processor", "projector_paths", "setup_stage"]

logger = logging.get_logger(__name__)

DTYPES = {name: name if name == "auto" else getattr(torch, name) for name in DTYPE_NAMES}


def build_base(config: RecipeConfig) -> None:
    """Build the VLM of the config's ``build:`` section into its ``save_dir`` (reused when built already), which
    is the run's ``model_name_or_path``; nothing for a config without one. Raises :class:`ConfigError`."""
    if config.build is None:
        return
    try:
        build.materialize(config.build)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"build: {err}") from err


def load_processor(config: RecipeConfig) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(config.model.processor_name_or_path or config.model.model_name_or_path)


def load_model(config: RecipeConfig) -> torch.nn.Module:
    """Load (4-bit for QLoRA), patch and return the model; an aligned checkpoint comes back patched already.

    A full run that resumes loads the checkpoint's weights here: the Trainer's own resume loads
    ``model.safetensors`` with ``strict=False`` under the current parameter names, while transformers writes
    legacy names for several families (LLaVA: ``multi_modal_projector.*`` for ``model.multi_modal_projector.*``),
    so a trained projector would silently keep its initial values.
    """
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": DTYPES[config.model.dtype]}
    if config.model.qlora:
        kwargs["quantization_config"] = bnb_config(4, config.model.model_name_or_path)
        if config.model.dtype == "auto":
            kwargs["dtype"] = torch.bfloat16
    with _whole_under_zero3(config.training):
        model = AutoModelForImageTextToText.from_pretrained(config.model_source, **kwargs)
    if config.model_source != config.model.model_name_or_path:  # record the model, not the checkpoint, as base
        model.name_or_path = model.config._name_or_path = config.model.model_name_or_path
    if config.normalign_config is not None:
        normalign.patch(model, config.normalign_config)
    return model


@contextmanager
def _whole_under_zero3(training_args: TrainingArguments) -> Iterator[None]:
    """Honour accelerate's ``zero3_init_flag: false``: load the model whole, so that it can be patched.

    Under ``accelerate launch`` with DeepSpeed, TrainingArguments registers transformers' ZeRO-3 config whatever
    the flag says, and ``from_pretrained`` then builds the model partitioned under ``deepspeed.zero.Init``
    (empty placeholders, which ``normalign.patch`` refuses); accelerate's ``zero3_init_context_manager(False)``
    does nothing when the flag is already false. The config is put back afterwards for the Trainer's engine.
    """
    plugin = training_args.deepspeed_plugin
    if plugin is None or plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def projector_paths(model: torch.nn.Module | ModelView) -> list[str]:
    """The projector and any extra projectors (Qwen3-VL's deepstack mergers): what stage 1 trains besides the
    plugin."""
    spec = ModelView.of(model).spec
    return [spec.projector, *spec.extra_projectors]


def setup_stage(model: torch.nn.Module, config: RecipeConfig) -> torch.nn.Module:
    """Freeze per stage; wrap with LoRA / QLoRA for stage 2. Returns the model to train.

    Stage 1: projector(s) and plugin. Stage 2 full: everything but the vision tower (LLM, ``lm_head``,
    projector, glue such as LLaVA-NeXT's ``image_newline``) and the plugin. Stage 2 LoRA / QLoRA: LoRA on the
    LLM's decoder Linears, projector(s) and plugin.
    """
    peft = config.model.lora or config.model.qlora
    if config.model.qlora:
        model = prepare_for_kbit_training(
            model,
            use_gradient_checkpointing=config.training.gradient_checkpointing,
            gradient_checkpointing_kwargs=config.training.gradient_checkpointing_kwargs,
        )
    if peft:
        model = _wrap_peft(model, config)
    view = ModelView.of(model)
    if not peft:
        view.base.requires_grad_(config.stage == 2)
        view.vision_tower.requires_grad_(False)
    # After the vision tower: Qwen-VL's projector (model.visual.merger) lives inside it.
    for path in projector_paths(view):
        view.base.get_submodule(path).requires_grad_(True)
    if not config.baseline:
        get_plugin(view.base).requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    what = "projector and plugin" if config.stage == 1 else "LoRA, projector and plugin" if peft else "all but vision"
    logger.info(f"stage {config.stage}: training {trainable:,} of {total:,} parameters ({what})")
    return model


def _lora_kwargs(model: torch.nn.Module, model_args: ModelArguments) -> dict[str, Any]:
    spec = ModelView.of(model).spec
    names = "|".join(re.escape(n.strip()) for n in model_args.lora_target_modules.split(",") if n.strip())
    # A regex limited to the LLM's decoder layers: bare names would also match the vision tower's q_proj etc.
    target = rf"{re.escape(spec.language_model)}\.{spec.layers_attr}\.\d+\..*\b({names})"
    return {
        "r": model_args.lora_r,
        "lora_alpha": model_args.lora_alpha,
        "lora_dropout": model_args.lora_dropout,
        "target_modules": target,
    }


def _wrap_peft(model: torch.nn.Module, config: RecipeConfig) -> torch.nn.Module:
    """LoRA on the LLM's decoder Linears; the plugin stays trainable, and every save of the adapter (each
    ``checkpoint-N``, QLoRA's final ``save_model``) writes the hf-normalign adapter files beside it: plugin and
    projector, on the base the run started from, which the Trainer's resume and ``normalign.from_pretrained`` read."""
    from peft import LoraConfig, get_peft_model

    if config.training.gradient_checkpointing and not config.model.qlora:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed layers need an input with grad
    model = get_peft_model(model, LoraConfig(**_lora_kwargs(model, config.model)))
    if not config.baseline:
        mark_plugin_trainable(model)
        base = config.model.model_name_or_path
        if os.path.isdir(base):  # a relative path would only resolve from this working directory
            base = os.path.abspath(base)
        save_plugin_with_adapter(model, include=("projector",), base_model_name_or_path=base)
    return model
