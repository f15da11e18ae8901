"""The hooks every patched model has, and the keyword arguments that carry one forward's state.

Hooks are module-level functions taking ``ref`` (a weak reference to the ``NormAlignModules`` plugin) first;
:func:`register_hooks` binds and registers them, with each method's own (``hf_normalign.methods``).

Per-forward flow (the state of one forward travels in its own keyword arguments, never on a module, so
concurrent forwards are independent and `torch.compile(fullgraph=True)` traces it without branches on
tensor values):
  input-module hook    -> vision-position mask from `input_ids` / `inputs_embeds` into kwargs
  the methods' hooks   -> projector LayerNorm (+ GWC) on the projector output; PRe's state and anchor
                          (methods/projector_norm.py, methods/pre.py)
  decoder-layer hooks  -> each method's `at_layer` on the layer output, in `METHODS` order: MoCa on vision
                          positions (`where` over the mask), then the PRe loss at its layer
  PRe's root post-hook -> `outputs.loss += weight * pre_loss`, `outputs["pre_loss"]`
Around them, on the root and the input module: enter / exit hooks counting the eager forwards in flight, so that
`unpatch` can refuse to run during one (`NormAlignModules.forward_entered`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

# transformers passes `**kwargs` from the top-level model through the inner model and the language model to
# every decoder layer, so the state of one forward reaches the layer hooks without being stored on a module.
VISION_MASK = "normalign_vision_mask"


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
    mask = _vision_mask(ref(), module, args, kwargs)
    if mask is not None and mask.dim() == 2:
        kwargs[VISION_MASK] = mask
    return args, kwargs


def _layer_hook(layer_idx, steps, ref, module, args, kwargs, output):
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
    plugin = ref()
    for at_layer in steps:
        hidden = at_layer(plugin, layer_idx, hidden, mask, kwargs)
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


def _enter_hook(ref, module, args):
    # Eager only: a compiled forward keeps no Python state (dynamo folds `is_compiling()`, so nothing is traced).
    if not torch.compiler.is_compiling():
        ref().forward_entered()


def _exit_hook(ref, module, args, output):
    if not torch.compiler.is_compiling():
        ref().forward_exited()


def register_hooks(plugin: nn.Module, target: Any, methods: Sequence[ModuleType]) -> None:
    """Register the hooks of ``plugin`` (a ``NormAlignModules``) on ``target``'s modules, through
    ``plugin.add_hook``: the vision mask, each method's own hooks, one hook per decoder layer a method acts at."""
    plugin.add_hook(target.input_module, "forward_pre", _input_pre_hook, with_kwargs=True)
    steps: dict[int, list[Callable[..., torch.Tensor]]] = {}
    for method in methods:
        if hasattr(method, "attach"):
            method.attach(plugin, target)
        if hasattr(method, "at_layer"):
            for i in method.layer_indices(plugin, target):
                steps.setdefault(i, []).append(method.at_layer)
    for i in sorted(steps):
        # prepend: transformers records `output_hidden_states` with its own lazily added hooks;
        # ours must run first for the recorded states to include MoCa.
        hook = functools.partial(_layer_hook, i, tuple(steps[i]))
        plugin.add_hook(target.layers[i], "forward", hook, prepend=True, with_kwargs=True)
    # Last, around all of the above: the in-flight count `unpatch` checks. On the input module too, which TRL's
    # fused-loss forward calls directly.
    for module in dict.fromkeys((target.base, target.input_module)):
        plugin.add_hook(module, "forward_pre", _enter_hook, prepend=True)
        plugin.add_hook(module, "forward", _exit_hook, always_call=True)
