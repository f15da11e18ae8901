"""Instance patching: plugin modules under `model.normalign`, wired in with forward hooks.

Nothing on a class is replaced. Hooks are registered on the modules the architecture spec names,
and they look up their plugin modules through a weak reference at call time; this keeps them
working under gradient checkpointing (hooks run outside the checkpointed `forward`), PEFT
wrappers (which copy or wrap the hooked modules, hooks included), quantised Linears and TRL's
fused-loss path (which calls the inner model, so the submodule hooks still run).

Each method's modules and hooks are in its module of `hf_normalign.methods`; the hooks every patched model has
and the per-forward flow are in `hf_normalign.hooks`.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import instance_methods
from . import methods as method_modules
from .config import METHODS, NormAlignConfig
from .hooks import register_hooks
from .methods import pre
from .model_view import ModelView
from .modeling import get_base_model
from .registry import ArchitectureSpec

ATTRIBUTE = "normalign"


@dataclass
class _Hook:
    module: nn.Module
    kind: str  # "forward_pre" or "forward"
    hook_id: int
    bound: _BoundHook

    def hook_dict(self, module: nn.Module) -> dict[int, Callable[..., Any]]:
        return module._forward_pre_hooks if self.kind == "forward_pre" else module._forward_hooks


class NormAlignModules(nn.Module):
    """The plugin modules of one patched model, registered as ``model.normalign``.

    Parameters have stable names: ``projector_norm.0`` (main projector; ``.1``... Qwen3-VL
    deepstack mergers), ``moca.layer_{i}_norm.{scale,shift}``, ``pre_head.{fc1,fc2}``. They stay fp32
    whatever dtype the base model is cast to.

    Holds configuration only: the per-forward state (vision mask, PRe anchor and loss) travels in the
    forward's own keyword arguments, so concurrent forwards on one model do not see each other's state.
    """

    def __init__(self, config: NormAlignConfig, spec: ArchitectureSpec):
        super().__init__()
        self.config = config
        self.spec = spec
        self.vision_token_ids: list[int] = []
        self._hooks: list[_Hook] = []
        self._reset_forward_tracking()

    def _reset_forward_tracking(self) -> None:
        # Eager forwards of the patched model now running (counted by the enter/exit hooks of
        # `hf_normalign.hooks`), so `unpatch` refuses instead of leaving them half-patched. `_depth` is per thread:
        # hooks nest (root, then input module), and an exit hook also runs (always_call) when a pre-hook before
        # the enter hook raised.
        self._in_flight = 0
        self._unpatching = False
        self._flight_lock = threading.Lock()
        self._depth = threading.local()

    def forward_entered(self) -> None:
        """Called by the enter hook of an eager forward; refuses forwards that start while `unpatch` runs."""
        with self._flight_lock:
            if self._unpatching:
                raise RuntimeError(
                    "hf_normalign.unpatch() is removing this model's hooks while this forward starts (another "
                    "thread), so it would run half-patched. Run forwards before or after unpatch(), not during it."
                )
            depth = getattr(self._depth, "value", 0)
            self._in_flight += depth == 0  # the root's and the input module's hooks of one forward count once
            self._depth.value = depth + 1

    def forward_exited(self) -> None:
        """Called by the exit hook (also when the forward raised)."""
        with self._flight_lock:
            depth = getattr(self._depth, "value", 0)
            if depth > 0:  # 0: this thread's enter hook never ran
                self._depth.value = depth - 1
                self._in_flight -= depth == 1

    def _begin_unpatch(self) -> None:
        with self._flight_lock:
            if self._in_flight:
                raise RuntimeError(
                    f"hf_normalign.unpatch(): {self._in_flight} forward(s) of this model are running (in other "
                    "threads); removing the hooks now would leave them half-patched. Wait for them to finish (join "
                    "the threads / shut the executor down), then call unpatch()."
                )
            self._unpatching = True

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> NormAlignModules:
        # `model.to(torch.bfloat16)` / `.half()` reach the plugin too; its few parameters train in fp32
        # (bf16 cannot represent MoCa's small updates to a scale of 1), so cast them back.
        super()._apply(fn, recurse)
        for param in self.parameters():
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
        return self

    # --- bookkeeping -------------------------------------------------------------------------
    def add_hook(self, module: nn.Module, kind: str, fn: Callable[..., Any], **kwargs: Any) -> None:
        bound = _BOUND_HOOK_CLASSES[kind, bool(kwargs.get("with_kwargs"))](fn, self)
        register = module.register_forward_pre_hook if kind == "forward_pre" else module.register_forward_hook
        handle = register(bound, **kwargs)
        self._hooks.append(_Hook(module, kind, handle.id, bound))

    def remove_hooks(self, root: nn.Module) -> None:
        """Remove this plugin's hooks from every module under `root`, including copies of hooked modules
        (PEFT's `modules_to_save` copies the projector, hooks included). Children before parents: the enter hooks
        on the root and input module go last, so a forward starting meanwhile meets one and is refused."""
        for module in reversed(list(root.modules())):
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for hook_id in [i for i, fn in hooks.items() if self._owns(fn)]:
                    hooks.pop(hook_id)
                    module._forward_hooks_with_kwargs.pop(hook_id, None)
                    module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
                    module._forward_hooks_always_called.pop(hook_id, None)
        self._hooks.clear()

    def _owns(self, fn: Callable[..., Any]) -> bool:
        return isinstance(fn, _BoundHook) and fn.ref() is self

    def __deepcopy__(self, memo: dict[int, Any]) -> NormAlignModules:
        # A deep copy of the whole model (TRL reference models) has already copied the hooked
        # modules' hook dicts; re-point the copied hooks at this copy so the two models do not
        # share plugin parameters. A copy of a single hooked module (PEFT `modules_to_save`) keeps
        # pointing at the original plugin, which is what its model trains and saves.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        tracking = ("_in_flight", "_unpatching", "_flight_lock", "_depth")  # a lock is not copyable; a copy runs none
        for key, value in self.__dict__.items():
            if key not in tracking:
                new.__dict__[key] = copy.deepcopy(value, memo)
        new._reset_forward_tracking()
        for hook in self._hooks:
            copied = memo.get(id(hook.hook_dict(hook.module)))
            if copied is not None:
                copied[hook.hook_id] = hook.bound.rebound(new)
        return new

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError(_NO_PICKLE)


_NO_PICKLE = (
    "A model patched by hf-normalign cannot be pickled (torch.save(model) pickles the whole object, hooks "
    "included). Save it with `model.save_pretrained(path)` (safetensors) and load it with "
    "`hf_normalign.from_pretrained(path)`."
)


class _BoundHook:
    """A hook function bound to a weak reference to its plugin (module hooks must not keep the plugin alive).

    Plain Python callables so torch.compile inlines them; pickling one (`torch.save(model)`) explains what to do.
    One subclass per hook signature, each with its own ``__call__`` code object and fixed arity: dynamo caches
    compiled frames per code object and guards on ``len(args)`` of a ``*args`` call, so hooks of different
    signatures sharing one ``__call__`` recompiled it for each kind (transformers compiles ``model.__call__``
    for ``generate(compile_config=...)``, which runs the root model's hooks as frames of their own).
    """

    def __init__(self, fn: Callable[..., Any], plugin: NormAlignModules):
        self.fn = fn
        self.ref = weakref.ref(plugin)

    def rebound(self, plugin: NormAlignModules) -> _BoundHook:
        """The same hook bound to another plugin (a deep copy's)."""
        return type(self)(self.fn, plugin)

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError(_NO_PICKLE)

    def __deepcopy__(self, memo: dict[int, Any]) -> _BoundHook:
        return self  # NormAlignModules.__deepcopy__ re-points the copied hooks at the copied plugin


class _PreHook(_BoundHook):
    def __call__(self, module: nn.Module, args: tuple) -> Any:
        return self.fn(self.ref, module, args)


class _PreHookWithKwargs(_BoundHook):
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        return self.fn(self.ref, module, args, kwargs)


class _ForwardHook(_BoundHook):
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.fn(self.ref, module, args, output)


class _ForwardHookWithKwargs(_BoundHook):
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        return self.fn(self.ref, module, args, kwargs, output)


# (kind, with_kwargs) -> the bound-hook class of that signature.
_BOUND_HOOK_CLASSES: dict[tuple[str, bool], type[_BoundHook]] = {
    ("forward_pre", False): _PreHook,
    ("forward_pre", True): _PreHookWithKwargs,
    ("forward", False): _ForwardHook,
    ("forward", True): _ForwardHookWithKwargs,
}


# --- public API ----------------------------------------------------------------------------------


def get_plugin(model: nn.Module) -> NormAlignModules | None:
    plugin = getattr(get_base_model(model), ATTRIBUTE, None)
    return plugin if isinstance(plugin, NormAlignModules) else None


def is_patched(model: nn.Module) -> bool:
    """Whether `model` carries hf-normalign plugin modules."""
    return get_plugin(model) is not None


def get_config(model: nn.Module) -> NormAlignConfig | None:
    """A copy of the config a model was patched with, or None."""
    plugin = get_plugin(model)
    return None if plugin is None else NormAlignConfig.from_dict(plugin.config.to_dict())


def set_loss_scaler(model: nn.Module, scaler: Any) -> None:
    """Declare the fp16 loss scaler (`torch.amp.GradScaler`) a training loop uses, or `None` for no scaling.

    PRe's gradient is injected at its decoder layer; under loss scaling it must carry the same scale as the LM
    gradient or its weight silently becomes ``weight / scale``. A PRe forward in fp16 (autocast or fp16
    weights) refuses to run until the scaler is declared. `NormAlignCallback` declares the HF Trainer's own.

    Example:
        >>> scaler = torch.amp.GradScaler("cuda")  # doctest: +SKIP
        >>> normalign.set_loss_scaler(model, scaler)  # doctest: +SKIP
        >>> scaler.scale(model(**batch).loss).backward()  # doctest: +SKIP
    """
    plugin = get_plugin(model)
    if plugin is None:
        raise ValueError("set_loss_scaler: this model is not patched by hf-normalign.")
    if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
        raise TypeError(f"set_loss_scaler expects a torch.amp.GradScaler or None, got {type(scaler).__name__}.")
    run = pre.run_state(plugin)
    if run is not None:  # only PRe injects a gradient that must follow the scale
        run.declare_loss_scaler(scaler)


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


def _refuse_partitioned(model: nn.Module) -> None:
    """DeepSpeed ZeRO-3 (``deepspeed.zero.Init``) leaves empty placeholders (``ds_id``) instead of weights, and
    patching measures the text-embedding norm and sizes the plugin from real weights."""
    if any(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()):
        raise ValueError(
            "this model's parameters are partitioned by DeepSpeed ZeRO-3 (built under deepspeed.zero.Init: empty "
            "placeholders with ds_id), so it cannot be patched. Load it whole, patch, then let the Trainer / "
            "deepspeed.initialize partition it: in a script, load and patch before creating the TrainingArguments "
            "(transformers builds models loaded after them partitioned); hf-normalign's recipes do it with "
            "accelerate's zero3_init_flag: false (hf_normalign/recipes/accelerate/deepspeed_zero3.yaml)."
        )


def _checked_vision_token_ids(view: ModelView) -> list[int]:
    """The config's placeholder ids, checked against the embedding now rather than failing inside the forward."""
    base, spec, ids = view.base, view.spec, view.vision_token_ids
    if spec.placeholder_outside_vocab:
        return ids
    embed = view.input_embeddings
    rows = embed.weight.shape[0] if hasattr(embed, "weight") else embed.num_embeddings
    for attr in (spec.image_token_attr, spec.video_token_attr):
        value = None if attr is None else getattr(base.config, attr, None)
        if value is not None and value >= rows:
            raise ValueError(
                f"config.{attr} is {value}, but this {spec.model_type!r} model's input embedding has {rows} rows "
                f"(ids 0..{rows - 1}): the forward would fail inside transformers. " + spec.token_attr_hint(attr)
            )
    return ids


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
    _refuse_partitioned(model)
    # A private copy: editing the caller's config afterwards must not change the patched model.
    config = NormAlignConfig.from_dict(_resolve_config(config, methods, overrides).to_dict())
    existing = get_plugin(model)
    if existing is not None:
        if existing.config == config:
            return model
        raise ValueError(
            f"This model is already patched with {existing.config}; refusing to patch it with {config}. "
            "Call `hf_normalign.unpatch(model)` first."
        )
    view = ModelView.of(model)
    view.spec.validate(view.base)
    plugin = NormAlignModules(config, view.spec)
    plugin.vision_token_ids = _checked_vision_token_ids(view)
    methods = [method_modules.load(name) for name in config.methods]
    for method in methods:  # each checks its config against the model first: an error leaves the model as it was
        method.build(plugin, view, init_weights=init_weights)
    plugin.train(view.base.training)
    view.base.add_module(ATTRIBUTE, plugin)
    register_hooks(plugin, view, methods)
    instance_methods.bind(view.base)  # its own save_pretrained / push_to_hub write the plugin files too
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every hook and plugin module; forward and `state_dict` are exactly as before `patch`.

    Must not run while another thread runs a forward of the model: with an eager forward in flight it raises
    (RuntimeError) and changes nothing; a forward that starts while it removes the hooks is refused. Compiled
    forwards are not tracked (see README, "Threads").
    """
    base = get_base_model(model)
    plugin = get_plugin(base)
    if plugin is None:
        raise ValueError("This model is not patched by hf-normalign; nothing to unpatch.")
    plugin._begin_unpatch()
    plugin.remove_hooks(base)
    delattr(base, ATTRIBUTE)
    instance_methods.unbind(base)
    return model
