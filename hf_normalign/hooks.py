"""The forward hooks that apply the methods, and the keyword arguments that carry one forward's state.

Hooks are module-level functions taking ``ref`` (a weak reference to the ``NormAlignModules`` plugin) first;
``hf_normalign.patching`` binds and registers them (:func:`register_hooks`).

Per-forward flow (the state of one forward travels in its own keyword arguments, never on a module, so
concurrent forwards are independent and `torch.compile(fullgraph=True)` traces it without branches on
tensor values):
  root pre-hook        -> PRe state {"active", "labels"} into kwargs (PRe runs with labels or in training)
  input-module hook    -> vision-position mask from `input_ids` / `inputs_embeds` into kwargs
  projector hook(s)    -> projector LayerNorm (+ GWC)
  LLM pre-hook         -> PRe anchor: the vision embeddings as the LLM receives them, into kwargs
  decoder-layer hooks  -> MoCa on vision positions (`where` over the mask); PRe loss at its layer, gradient
                          injected there, value written into the PRe state
  root post-hook       -> `outputs.loss += weight * pre_loss`, `outputs["pre_loss"]`
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import typing
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput
from transformers.utils.import_utils import torch_compilable_check

from .methods.moca import moca_key
from .methods.pre import InjectAuxLoss, pre_loss
from .spec import ArchitectureSpec

# Keyword arguments our pre-hooks add to the forward's own call. transformers passes `**kwargs` from the
# top-level model through the inner model and the language model to every decoder layer, so the state of
# one forward reaches the layer hooks without being stored on a shared module.
VISION_MASK = "normalign_vision_mask"
PRE_ANCHOR = "normalign_pre_anchor"
PRE_STATE = "normalign_pre_state"  # {"active": bool, "labels": bool, "loss": Tensor}


def _pre_state(plugin: nn.Module, labels_given: bool) -> dict[str, Any]:
    return {"active": plugin.training or labels_given, "labels": labels_given}


# --- hooks (module-level functions; `ref` is a weak reference to the NormAlignModules) ----------


def _root_pre_hook(ref, module, args, kwargs):
    kwargs[PRE_STATE] = _pre_state(ref(), kwargs.get("labels") is not None)
    return args, kwargs


def _root_post_hook(ref, module, args, kwargs, output):
    plugin = ref()
    state = kwargs.get(PRE_STATE) or {}
    loss = state.get("loss")
    if loss is None:
        return None
    # Detached: the PRe gradient is already injected at the PRe layer (see InjectAuxLoss).
    weighted = plugin.config.pre.weight * plugin.pre_grad_scale * plugin.pre_loss_term_scale * loss
    if isinstance(output, ModelOutput):
        fields = dict(output.items())
        if fields.get("loss") is not None:
            fields["loss"] = fields["loss"] + weighted.to(fields["loss"])
        return _with_pre_loss(type(output))(**fields, pre_loss=loss)
    # return_dict=False: (loss, logits, ...) when labels were given; the unweighted PRe loss is appended last,
    # where `_with_pre_loss` puts it in `to_tuple()` too.
    output = tuple(output)
    if state["labels"]:
        output = (output[0] + weighted.to(output[0]), *output[1:])
    return (*output, loss)


# ModelOutput subclass -> the same with a declared `pre_loss` field. DDP and other code rebuild outputs from
# their fields (`cls(**dict)`), which fails for a key set on an instance only. Filled at patch time from the
# forward's return annotation, so a compiled forward only looks the class up.
_PRE_OUTPUT_CLASSES: dict[type, type] = {}


def _with_pre_loss(output_class: type[ModelOutput]) -> type[ModelOutput]:
    cls = _PRE_OUTPUT_CLASSES.get(output_class)
    if cls is None:
        field = ("pre_loss", torch.Tensor | None, dataclasses.field(default=None))
        cls = dataclasses.make_dataclass(output_class.__name__, [field], bases=(output_class,))
        _PRE_OUTPUT_CLASSES[output_class] = cls
    return cls


def prime_output_classes(model: nn.Module) -> None:
    try:
        annotation = typing.get_type_hints(type(model).forward).get("return")
    except Exception:  # unresolvable annotations: the class is then made at the first eager forward
        return
    for candidate in typing.get_args(annotation) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, ModelOutput):
            _with_pre_loss(candidate)


def _vision_mask(plugin: nn.Module, module: nn.Module, args, kwargs) -> torch.Tensor | None:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is not None:
        ids = torch.tensor(plugin.vision_token_ids, device=input_ids.device)
        return torch.isin(input_ids, ids)
    inputs_embeds = kwargs.get("inputs_embeds")
    if inputs_embeds is None:
        return None
    # Same rule as transformers' `get_placeholder_mask` when only embeddings are given.
    embed = module.get_input_embeddings()
    ids = torch.tensor(plugin.vision_token_ids, device=inputs_embeds.device)
    placeholders = embed(ids).to(inputs_embeds.dtype)
    return (inputs_embeds.unsqueeze(-2) == placeholders).all(-1).any(-1)


def _input_pre_hook(ref, module, args, kwargs):
    plugin = ref()
    mask = _vision_mask(plugin, module, args, kwargs)
    if mask is not None and mask.dim() == 2:
        kwargs[VISION_MASK] = mask
    if plugin.config.pre is not None and PRE_STATE not in kwargs:
        # The inner model called directly (TRL's fused-loss forward): no labels reach it.
        kwargs[PRE_STATE] = _pre_state(plugin, labels_given=False)
    return args, kwargs


def _projector_hook(index, ref, module, args, output):
    norm = ref().projector_norm[index]
    if isinstance(output, torch.Tensor):
        return norm(output)
    return (norm(output[0]), *output[1:])


# anchor="encoder_output" (an ablation): the projector is called inside the inner model without its keyword
# arguments, so its input rows reach the language-model pre-hook through a thread-local (eager mode only).
_encoder_anchor = threading.local()


def _projector_anchor_hook(ref, module, args):
    # Rows as the projector's first Linear sees them (Qwen's merger groups 4 patches a row).
    _encoder_anchor.rows = args[0].reshape(-1, ref().pre_head.fc2.out_features).detach()


def _language_model_pre_hook(ref, module, args, kwargs):
    plugin = ref()
    encoder_rows = None
    if plugin.config.pre.anchor == "encoder_output":
        encoder_rows, _encoder_anchor.rows = getattr(_encoder_anchor, "rows", None), None
    state = kwargs.get(PRE_STATE)
    embeds = kwargs.get("inputs_embeds")
    mask = kwargs.get(VISION_MASK)
    if state is None or not state["active"] or embeds is None or mask is None:
        return None
    if plugin.config.pre.anchor == "llm_input":
        kwargs[PRE_ANCHOR] = embeds.detach()
        return args, kwargs
    rows = encoder_rows
    if rows is None:
        raise RuntimeError("PRe anchor='encoder_output' found no projector input for this forward.")
    torch_compilable_check(
        rows.shape[0] == mask.sum(),
        lambda: (
            f"PRe anchor='encoder_output': {rows.shape[0]} projector input rows but {int(mask.sum())} vision "
            "positions. The projector must map its input rows one-to-one to vision positions; use "
            "anchor='llm_input' for this model."
        ),
        RuntimeError,
    )
    anchor = rows.new_zeros((*mask.shape, rows.shape[-1]), dtype=torch.float32)
    kwargs[PRE_ANCHOR] = anchor.masked_scatter(mask.unsqueeze(-1), rows.float())
    return args, kwargs


def _layer_hook(layer_idx, ref, module, args, kwargs, output):
    plugin = ref()
    mask = kwargs.get(VISION_MASK)
    if mask is None:  # the layer was called outside a forward of the patched model
        return None
    hidden = output if isinstance(output, torch.Tensor) else output[0]
    if hidden.shape[:2] != mask.shape:
        raise RuntimeError(
            f"Decoder layer {layer_idx} returned hidden states of shape {tuple(hidden.shape)}, but the vision "
            f"mask has shape {tuple(mask.shape)}. Padding-free / packed sequences are not "
            "supported by hf-normalign; pad the batch instead."
        )
    key = moca_key(layer_idx)
    if plugin.config.moca is not None and key in plugin.moca:
        hidden = plugin.moca[key](hidden, mask)
    state = kwargs.get(PRE_STATE)
    if layer_idx == plugin.pre_layer and state is not None and state["active"]:
        hidden = _apply_pre(plugin, hidden, mask, kwargs[PRE_ANCHOR], state)
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


def _apply_pre(
    plugin: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, anchor: torch.Tensor, state: dict
) -> torch.Tensor:
    loss = pre_loss(plugin.pre_head, hidden, anchor, mask)
    state["loss"] = plugin.last_pre_loss = loss.detach()
    if torch.is_grad_enabled() and loss.requires_grad:
        _check_loss_scaling(plugin, hidden)
        hidden = InjectAuxLoss.apply(hidden, loss, plugin.pre_loss_coefficient(hidden.device))
    return hidden


def _check_loss_scaling(plugin: nn.Module, hidden: torch.Tensor) -> None:
    device = hidden.device.type
    fp16 = hidden.dtype == torch.float16 or (
        torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    )
    if fp16 and not plugin.loss_scaler_declared:
        raise RuntimeError(
            "PRe is training in fp16, where the loss is usually scaled (GradScaler): the injected PRe gradient "
            "must be scaled the same way or its weight silently becomes weight / scale. Declare the scaler with "
            "`hf_normalign.set_loss_scaler(model, scaler)` (`None` if you do not scale the loss), or add "
            "`hf_normalign.NormAlignCallback()` to an HF/TRL Trainer, which does it for you."
        )


def register_hooks(
    plugin: nn.Module, base: nn.Module, spec: ArchitectureSpec, layers, projectors, moca_layers: list[int]
) -> None:
    """Register the hooks of ``plugin`` (a ``NormAlignModules``) on ``base``'s modules, through ``plugin.add_hook``."""
    config = plugin.config
    plugin.add_hook(spec.get(base, spec.input_module), "forward_pre", _input_pre_hook, with_kwargs=True)
    if config.projector_norm is not None:
        for index, projector in enumerate(projectors):
            plugin.add_hook(projector, "forward", functools.partial(_projector_hook, index))
    if config.pre is not None:
        plugin.add_hook(base, "forward_pre", _root_pre_hook, with_kwargs=True)
        plugin.add_hook(base, "forward", _root_post_hook, with_kwargs=True)
        plugin.add_hook(spec.get(base, spec.language_model), "forward_pre", _language_model_pre_hook, with_kwargs=True)
        if config.pre.anchor == "encoder_output":
            plugin.add_hook(projectors[0], "forward_pre", _projector_anchor_hook)
    hooked = set(moca_layers) | ({plugin.pre_layer} if config.pre is not None else set())
    for i in sorted(hooked):
        # prepend: transformers records `output_hidden_states` with its own lazily added hooks;
        # ours must run first for the recorded states to include MoCa.
        plugin.add_hook(layers[i], "forward", functools.partial(_layer_hook, i), prepend=True, with_kwargs=True)
