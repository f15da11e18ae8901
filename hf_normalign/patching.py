"""Instance patching: plugin modules under `model.normalign`, wired in with forward hooks.

Nothing on a class is replaced. Hooks are registered on the modules the architecture spec names,
and they look up their plugin modules through a weak reference at call time; this keeps them
working under gradient checkpointing (hooks run outside the checkpointed `forward`), PEFT
wrappers (which copy or wrap the hooked modules, hooks included), quantised Linears and TRL's
fused-loss path (which calls the inner model, so the submodule hooks still run).

Per-forward flow:
  root pre-hook        -> remembers whether `labels` were passed (PRe is computed with labels
                          or in training mode only)
  input-module hooks   -> vision-position mask from `input_ids` / `inputs_embeds`, cleared after
  projector hook(s)    -> projector LayerNorm (+ GWC)
  LLM pre-hook         -> PRe anchor: the vision embeddings as the LLM receives them
  decoder-layer hooks  -> MoCa on vision rows; PRe loss at its layer, gradient injected there
  root post-hook       -> `outputs.loss += weight * pre_loss`, `outputs["pre_loss"]`
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .config import METHODS, NormAlignConfig
from .methods.moca import MoCaLayer, moca_key
from .methods.pre import InjectAuxLoss, PReHead, pre_loss
from .methods.projector_norm import ProjectorLayerNorm
from .registry import ArchitectureSpec, embedding_scale, get_spec

ATTRIBUTE = "normalign"


@dataclass
class _Hook:
    module: nn.Module
    kind: str  # "forward_pre" or "forward"
    hook_id: int
    fn: Callable[..., Any]

    def hook_dict(self, module: nn.Module) -> dict[int, Callable[..., Any]]:
        return module._forward_pre_hooks if self.kind == "forward_pre" else module._forward_hooks


class NormAlignModules(nn.Module):
    """The plugin modules of one patched model, registered as ``model.normalign``.

    Parameters have stable names: ``projector_norm.0`` (main projector; ``.1``... Qwen3-VL
    deepstack mergers), ``moca.layer_{i}_norm.{scale,shift}``, ``pre_head.{fc1,fc2}``.
    """

    def __init__(self, config: NormAlignConfig, spec: ArchitectureSpec):
        super().__init__()
        self.config = config
        self.spec = spec
        self.vision_token_ids: list[int] = []
        self.pre_layer: int | None = None
        # Set by `NormAlignCallback` to 1 / gradient_accumulation_steps so the injected PRe
        # gradient keeps its weight when the trainer divides the LM loss.
        self.pre_grad_scale = 1.0
        self.labels_given = False
        # The unweighted PRe loss of the latest forward that computed one (detached).
        self.last_pre_loss: torch.Tensor | None = None
        self._hooks: list[_Hook] = []
        self._reset_forward_state()

    def _reset_forward_state(self) -> None:
        self.vision_mask: torch.Tensor | None = None
        self.vision_index: tuple[torch.Tensor, torch.Tensor] | None = None
        self.has_vision = False
        self.anchor: torch.Tensor | None = None

    # --- bookkeeping -------------------------------------------------------------------------
    def add_hook(self, module: nn.Module, kind: str, fn: Callable[..., Any], **kwargs: Any) -> None:
        bound = functools.partial(fn, weakref.ref(self))
        register = module.register_forward_pre_hook if kind == "forward_pre" else module.register_forward_hook
        handle = register(bound, **kwargs)
        self._hooks.append(_Hook(module, kind, handle.id, fn))

    def remove_hooks(self, root: nn.Module) -> None:
        """Remove this plugin's hooks from every module under `root`, including copies of hooked modules
        (PEFT's `modules_to_save` copies the projector, hooks included)."""
        for module in root.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for hook_id in [i for i, fn in hooks.items() if self._owns(fn)]:
                    hooks.pop(hook_id)
                    module._forward_hooks_with_kwargs.pop(hook_id, None)
                    module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
                    module._forward_hooks_always_called.pop(hook_id, None)
        self._hooks.clear()

    def _owns(self, fn: Callable[..., Any]) -> bool:
        return isinstance(fn, functools.partial) and any(
            isinstance(arg, weakref.ref) and arg() is self for arg in fn.args
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> NormAlignModules:
        # A deep copy of the whole model (TRL reference models) has already copied the hooked
        # modules' hook dicts; re-point the copied hooks at this copy so the two models do not
        # share plugin parameters. A copy of a single hooked module (PEFT `modules_to_save`) keeps
        # pointing at the original plugin, which is what its model trains and saves.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        for hook in self._hooks:
            copied = memo.get(id(hook.hook_dict(hook.module)))
            if copied is not None:
                copied[hook.hook_id] = functools.partial(hook.fn, weakref.ref(new))
        return new

    @property
    def pre_active(self) -> bool:
        return self.config.pre is not None and self.has_vision and (self.training or self.labels_given)


# --- hooks (module-level functions; `ref` is a weak reference to the NormAlignModules) ----------


def _root_pre_hook(ref, module, args, kwargs):
    plugin = ref()
    plugin.labels_given = kwargs.get("labels") is not None
    # A batch without vision tokens contributes an explicit 0 (the layer hook overwrites it).
    computes = plugin.training or plugin.labels_given
    plugin.last_pre_loss = plugin.pre_head.fc1.weight.new_zeros(()) if computes else None


def _root_post_hook(ref, module, args, kwargs, output):
    plugin = ref()
    loss = plugin.last_pre_loss
    if loss is None or not isinstance(output, ModelOutput):
        return None
    fields = dict(output.items())
    if fields.get("loss") is not None:
        # Detached: the PRe gradient is already injected at the PRe layer (see InjectAuxLoss).
        fields["loss"] = fields["loss"] + plugin.config.pre.weight * plugin.pre_grad_scale * loss.to(fields["loss"])
    return _with_pre_loss(type(output))(**fields, pre_loss=loss)


@functools.cache
def _with_pre_loss(output_class: type[ModelOutput]) -> type[ModelOutput]:
    """`output_class` with a declared `pre_loss` field: DDP and other code rebuild outputs from their
    fields (`cls(**dict)`), which fails for a key set on an instance only."""
    field = ("pre_loss", torch.Tensor | None, dataclasses.field(default=None))
    return dataclasses.make_dataclass(output_class.__name__, [field], bases=(output_class,))


def _vision_mask(plugin: NormAlignModules, module: nn.Module, args, kwargs) -> torch.Tensor | None:
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
    plugin._reset_forward_state()
    mask = _vision_mask(plugin, module, args, kwargs)
    if mask is not None and mask.dim() == 2:
        plugin.vision_mask = mask
        plugin.vision_index = mask.nonzero(as_tuple=True)
        plugin.has_vision = plugin.vision_index[0].numel() > 0


def _input_post_hook(ref, module, args, kwargs, output):
    ref()._reset_forward_state()


def _projector_hook(index, ref, module, args, output):
    norm = ref().projector_norm[index]
    if isinstance(output, torch.Tensor):
        return norm(output)
    return (norm(output[0]), *output[1:])


def _projector_anchor_hook(ref, module, args):
    plugin = ref()
    if plugin.pre_active:
        # Rows as the projector's first Linear sees them (Qwen's merger groups 4 patches a row).
        plugin.anchor = args[0].reshape(-1, plugin.pre_head.fc2.out_features).detach()


def _language_model_pre_hook(ref, module, args, kwargs):
    plugin = ref()
    embeds = kwargs.get("inputs_embeds")
    if plugin.pre_active and embeds is not None:
        plugin.anchor = embeds[plugin.vision_index].detach()


def _layer_hook(layer_idx, ref, module, args, output):
    plugin = ref()
    if not plugin.has_vision:
        return None
    hidden = output if isinstance(output, torch.Tensor) else output[0]
    if hidden.shape[:2] != plugin.vision_mask.shape:
        raise RuntimeError(
            f"Decoder layer {layer_idx} returned hidden states of shape {tuple(hidden.shape)}, but the vision "
            f"mask has shape {tuple(plugin.vision_mask.shape)}. Padding-free / packed sequences are not "
            "supported by hf-normalign; pad the batch instead."
        )
    key = moca_key(layer_idx)
    if plugin.config.moca is not None and key in plugin.moca:
        vision = hidden[plugin.vision_index]
        hidden = hidden.index_put(plugin.vision_index, plugin.moca[key](vision))
    if layer_idx == plugin.pre_layer and plugin.pre_active:
        hidden = _apply_pre(plugin, layer_idx, hidden)
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


def _apply_pre(plugin: NormAlignModules, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
    vision = hidden[plugin.vision_index]
    anchor = plugin.anchor
    if anchor is None or anchor.shape[0] != vision.shape[0]:
        got = None if anchor is None else anchor.shape[0]
        raise RuntimeError(
            f"PRe at layer {layer_idx}: {vision.shape[0]} vision positions but {got} anchor rows. With "
            "anchor='encoder_output' the projector must map its input rows one-to-one to vision positions; "
            "use anchor='llm_input' for this model."
        )
    loss = pre_loss(plugin.pre_head, vision, anchor)
    plugin.last_pre_loss = loss.detach()
    if torch.is_grad_enabled() and loss.requires_grad:
        hidden = InjectAuxLoss.apply(hidden, loss, plugin.config.pre.weight * plugin.pre_grad_scale)
    return hidden


# --- public API ----------------------------------------------------------------------------------


def _base_model(model: nn.Module) -> nn.Module:
    """The `...ForConditionalGeneration` under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def get_plugin(model: nn.Module) -> NormAlignModules | None:
    plugin = getattr(_base_model(model), ATTRIBUTE, None)
    return plugin if isinstance(plugin, NormAlignModules) else None


def is_patched(model: nn.Module) -> bool:
    """Whether `model` carries hf-normalign plugin modules."""
    return get_plugin(model) is not None


def get_config(model: nn.Module) -> NormAlignConfig | None:
    """A copy of the config a model was patched with, or None."""
    plugin = get_plugin(model)
    return None if plugin is None else NormAlignConfig.from_dict(plugin.config.to_dict())


def _resolve_config(config, methods, overrides) -> NormAlignConfig:
    if config is not None and methods is not None:
        raise ValueError("Pass either `config` or `methods`, not both.")
    if isinstance(config, dict):
        config = NormAlignConfig.from_dict(config)
    if config is None:
        if methods is None:
            given = [m for m in METHODS if overrides.get(m)]
            if not given:
                raise ValueError(f"Nothing to patch: pass methods=... (any of {list(METHODS)}) or a NormAlignConfig.")
            methods = given
        return NormAlignConfig.from_methods(methods, **overrides)
    if overrides:
        raise ValueError("Keyword overrides apply to `methods=`; with a NormAlignConfig, set them on it.")
    if not isinstance(config, NormAlignConfig):
        raise TypeError(f"config must be a NormAlignConfig, got {type(config).__name__}")
    if not config.methods:
        raise ValueError("The NormAlignConfig enables no method; set projector_norm, moca or pre.")
    return config


def _check_layers(config: NormAlignConfig, num_layers: int) -> tuple[list[int], int | None]:
    moca_layers: list[int] = []
    if config.moca is not None:
        moca_layers = list(range(num_layers)) if config.moca.layers is None else list(config.moca.layers)
        bad = [i for i in moca_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"MoCaConfig.layers names layers {bad}, but the model has {num_layers} decoder layers "
                f"(valid: 0..{num_layers - 1})."
            )
    pre_layer = None
    if config.pre is not None:
        pre_layer = num_layers // 2 if config.pre.layer is None else config.pre.layer
        if not 0 <= pre_layer < num_layers:
            raise ValueError(
                f"PReConfig.layer={pre_layer} is out of range: the model has {num_layers} decoder layers "
                f"(valid: 0..{num_layers - 1}; default {num_layers // 2})."
            )
    return moca_layers, pre_layer


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        if tensor.device.type == "meta":
            raise ValueError(
                f"{type(module).__name__} has its weights on the meta device (disk offload or an unloaded model); "
                "plugin modules cannot be placed there. Load the model with a device_map that keeps the "
                "projector and decoder layers on CPU/GPU."
            )
        return tensor.device
    return torch.device("cpu")


def _projector_input_size(projector: nn.Module) -> int:
    first = next((m for m in projector.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ValueError("PRe anchor='encoder_output' needs a projector that starts with a Linear layer.")
    return first.in_features


def patch(
    model: nn.Module,
    config: NormAlignConfig | dict | None = None,
    *,
    methods=None,
    init_weights: bool = True,
    **overrides,
) -> nn.Module:
    """Insert the norm-aligning interventions into a loaded VLM, in place. Returns `model`.

    Example:
        >>> import hf_normalign as normalign
        >>> model = normalign.testing.tiny_model("llava")
        >>> model = normalign.patch(model, methods=["projector_norm", "moca"])
        >>> normalign.is_patched(model)
        True

    Args:
        model: a `...ForConditionalGeneration` of a supported family (or a PEFT model around one).
        config: a `NormAlignConfig` (or its dict form).
        methods: method name(s) instead of a config: "projector_norm", "moca", "pre".
        init_weights: False skips the initialisation that needs a pass over the model (measuring the
            text-embedding norm), for callers that load saved plugin weights right after.
        **overrides: a method's own config, e.g. ``moca=MoCaConfig(layers=[0, 1])``.

    Patching an already patched model with the same config is a no-op; a different config raises.
    """
    if not isinstance(model, nn.Module):  # a repo id or None would otherwise fail as "model_type None"
        raise TypeError(
            f"patch() takes a loaded model, got {model!r} ({type(model).__name__}). Load it first, e.g. "
            "AutoModelForImageTextToText.from_pretrained(repo_id), or load an aligned checkpoint with "
            "hf_normalign.from_pretrained(repo_id)."
        )
    # A private copy: editing the caller's config afterwards must not change the patched model.
    config = NormAlignConfig.from_dict(_resolve_config(config, methods, overrides).to_dict())
    base = _base_model(model)
    existing = get_plugin(base)
    if existing is not None:
        if existing.config == config:
            return model
        raise ValueError(
            f"This model is already patched with {existing.config}; refusing to patch it with {config}. "
            "Call `hf_normalign.unpatch(model)` first."
        )
    spec = get_spec(base)
    layers = spec.decoder_layers(base)
    moca_layers, pre_layer = _check_layers(config, len(layers))
    hidden = spec.hidden_size(base.config)

    plugin = NormAlignModules(config, spec)
    plugin.vision_token_ids = spec.vision_token_ids(base.config)
    plugin.pre_layer = pre_layer

    projectors = [spec.get(base, spec.projector)]
    if config.projector_norm is not None:
        pn = config.projector_norm
        if pn.deepstack:
            for path in spec.extra_projectors:
                projectors.extend(spec.get(base, path))
        devices = [_device_of(p) for p in projectors]  # the meta-device check first: embedding_scale reads weights
        target = pn.target_norm
        if target is None:
            # Without init the gain is a placeholder the caller overwrites with saved weights.
            target = embedding_scale(base, spec) if init_weights else 1.0
        plugin.projector_norm = nn.ModuleList(
            ProjectorLayerNorm(hidden, target_norm=target, gwc=pn.gwc, gwc_floor=pn.gwc_floor, eps=pn.eps).to(device)
            for device in devices
        )
    if config.moca is not None:
        generator = torch.Generator().manual_seed(0)
        plugin.moca = nn.ModuleDict(
            {
                moca_key(i): MoCaLayer(hidden, init_std=config.moca.init_std, generator=generator).to(
                    _device_of(layers[i])
                )
                for i in moca_layers
            }
        )
    if config.pre is not None:
        anchor_size = hidden if config.pre.anchor == "llm_input" else _projector_input_size(projectors[0])
        head_hidden = config.pre.head_hidden_size or hidden
        plugin.pre_head = PReHead(hidden, head_hidden, anchor_size).to(_device_of(layers[pre_layer]))

    plugin.train(base.training)
    base.add_module(ATTRIBUTE, plugin)
    _register_hooks(plugin, base, spec, layers, projectors, moca_layers)
    return model


def _register_hooks(plugin, base, spec, layers, projectors, moca_layers) -> None:
    config = plugin.config
    plugin.add_hook(spec.get(base, spec.input_module), "forward_pre", _input_pre_hook, with_kwargs=True)
    plugin.add_hook(spec.get(base, spec.input_module), "forward", _input_post_hook, with_kwargs=True, always_call=True)
    if config.projector_norm is not None:
        for index, projector in enumerate(projectors):
            plugin.add_hook(projector, "forward", functools.partial(_projector_hook, index))
    if config.pre is not None:
        plugin.add_hook(base, "forward_pre", _root_pre_hook, with_kwargs=True)
        plugin.add_hook(base, "forward", _root_post_hook, with_kwargs=True)
        if config.pre.anchor == "llm_input":
            plugin.add_hook(
                spec.get(base, spec.language_model), "forward_pre", _language_model_pre_hook, with_kwargs=True
            )
        else:
            plugin.add_hook(projectors[0], "forward_pre", _projector_anchor_hook)
    hooked = set(moca_layers) | ({plugin.pre_layer} if config.pre is not None else set())
    for i in sorted(hooked):
        # prepend: transformers records `output_hidden_states` with its own lazily added hooks;
        # ours must run first for the recorded states to include MoCa.
        plugin.add_hook(layers[i], "forward", functools.partial(_layer_hook, i), prepend=True)


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every hook and plugin module; forward and `state_dict` are exactly as before `patch`."""
    base = _base_model(model)
    plugin = get_plugin(base)
    if plugin is None:
        raise ValueError("This model is not patched by hf-normalign; nothing to unpatch.")
    plugin.remove_hooks(base)
    delattr(base, ATTRIBUTE)
    return model
