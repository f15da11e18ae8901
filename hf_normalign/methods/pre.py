"""PRe: predictive regularisation of a middle layer's vision states (arXiv 2603.20808).

Per-forward flow (state in the forward's own keyword arguments, see `hf_normalign.hooks`):
  root pre-hook       -> PRe state {"active", "labels"} (PRe runs with labels or in training)
  input-module hook   -> the same state when the inner model is called directly (TRL's fused-loss forward)
  LLM pre-hook        -> the anchor: the vision embeddings as the LLM receives them
  its decoder layer   -> the loss; its gradient injected there (`InjectAuxLoss`), its value into the state
  root post-hook      -> ``outputs.loss += weight * pre_loss`` and ``outputs["pre_loss"]``
"""

from __future__ import annotations

import dataclasses
import threading
import typing
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput
from transformers.utils.import_utils import torch_compilable_check

from ..hooks import VISION_MASK

PRE_ANCHOR = "normalign_pre_anchor"
PRE_STATE = "normalign_pre_state"  # {"active": bool, "labels": bool, "loss": Tensor}


class PReHead(nn.Module):
    """Linear(D, H) -> GELU -> Linear(H, D_anchor), in fp32 (also under autocast). Training-only."""

    def __init__(self, hidden_size: int, head_hidden_size: int, anchor_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, head_hidden_size, dtype=torch.float32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(head_hidden_size, anchor_size, dtype=torch.float32)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Autocast (bf16/fp16 mixed precision, TRL's default) would run these Linears in half precision.
        with torch.autocast(hidden.device.type, enabled=False):
            return self.fc2(self.act(self.fc1(hidden.float())))


def pre_loss(head: PReHead, hidden: torch.Tensor, anchor: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
    """Mean over vision positions of ``1 - cos(head(h), sg(anchor))``; exactly 0 without vision positions.

    `hidden` [batch, seq, D], `anchor` [batch, seq, D_anchor], `vision_mask` [batch, seq]. The head runs on
    every position and the mask weights the mean, so no shape depends on the data (compile-friendly).
    """
    cos = F.cosine_similarity(head(hidden), anchor.detach().float(), dim=-1)
    weights = vision_mask.to(cos.dtype)
    return ((1.0 - cos) * weights).sum() / weights.sum().clamp_min(1.0)


class InjectAuxLoss(torch.autograd.Function):
    """Identity on `hidden`; its backward also back-propagates ``coef * aux_loss``.

    Placed on a tensor every loss depends on (a decoder layer's output), it delivers the PRe gradient to a
    trainer that builds its own loss from the logits and ignores `outputs.loss`. `coef` is a 0-dim tensor
    holding ``weight * accumulation factor * loss scale``: under fp16 loss scaling the LM gradient arrives
    multiplied by the scale, so the injected one must be too.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux_loss: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coef)
        ctx.loss_dtype = aux_loss.dtype
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (coef,) = ctx.saved_tensors
        return grad, coef.to(ctx.loss_dtype), None


# --- run state -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class PReRun:
    """PRe's state on one patched model (``plugin.pre_run``): its layer, the factors a training loop sets and the
    latest loss. The per-forward state travels in the forward's kwargs (`PRE_STATE`); this is what outlives it."""

    layer: int
    weight: float
    # 1 / gradient_accumulation_steps (set by `NormAlignCallback`), so the injected gradient keeps its weight
    # when the trainer divides the LM loss.
    grad_scale: float = 1.0
    # Multiplies only the detached PRe term added to `outputs.loss` (a value for logging; the gradient is
    # injected): set by `NormAlignCallback` to cancel the HF Trainer's `loss *= num_processes`.
    loss_term_scale: float = 1.0
    loss_scaler: Any = None  # fp16 loss scaling: see `hf_normalign.set_loss_scaler`
    loss_scaler_declared: bool = False
    last_loss: torch.Tensor | None = None  # the unweighted loss of the latest forward that computed one, detached

    def declare_loss_scaler(self, scaler: Any) -> None:
        self.loss_scaler, self.loss_scaler_declared = scaler, True

    def end_training_run(self) -> None:
        """Back to a plain model: the factors belong to one Trainer run."""
        self.grad_scale = self.loss_term_scale = 1.0
        self.loss_scaler, self.loss_scaler_declared = None, False

    def coefficient(self, device: torch.device) -> torch.Tensor:
        """``weight * accumulation factor * loss scale`` for the injected gradient, as a 0-dim tensor."""
        coef = self.weight * self.grad_scale
        scaler = self.loss_scaler
        if scaler is None:
            return torch.tensor(coef, dtype=torch.float32, device=device)
        scale = getattr(scaler, "_scale", None)  # GradScaler's live scale tensor (no host sync); None before use
        if scale is None:
            return torch.tensor(coef * float(scaler.get_scale()), dtype=torch.float32, device=device)
        return (scale.to(device=device, dtype=torch.float32) * coef).reshape(())


def run_state(plugin: nn.Module | None) -> PReRun | None:
    """The PRe state of a plugin (a ``NormAlignModules``), or None when it has no PRe."""
    return getattr(plugin, "pre_run", None)


# --- wiring (the protocol of hf_normalign.methods) ---------------------------------------------------------------


def layer_indices(plugin: nn.Module, view: Any) -> list[int]:
    return [plugin.pre_run.layer]


def build(plugin: nn.Module, view: Any, *, init_weights: bool = True) -> None:
    config, num_layers = plugin.config.pre, len(view.layers)
    layer = num_layers // 2 if config.layer is None else config.layer
    if not 0 <= layer < num_layers:
        raise ValueError(
            f"PReConfig.layer={layer} is out of range: the model has {num_layers} decoder layers "
            f"(valid: 0..{num_layers - 1}; default {num_layers // 2})."
        )
    hidden = view.hidden_size
    anchor_size = hidden if config.anchor == "llm_input" else _projector_input_size(view.projector)
    plugin.pre_run = PReRun(layer=layer, weight=config.weight)
    plugin.pre_head = PReHead(hidden, config.head_hidden_size or hidden, anchor_size).to(
        view.device_of(view.layers[layer])
    )
    _prime_output_classes(view.base)


def attach(plugin: nn.Module, view: Any) -> None:
    plugin.add_hook(view.base, "forward_pre", _root_pre_hook, with_kwargs=True)
    plugin.add_hook(view.base, "forward", _root_post_hook, with_kwargs=True)
    # Before the LLM pre-hook, which reads the state (the input module may be the language model itself).
    plugin.add_hook(view.input_module, "forward_pre", _input_pre_hook, with_kwargs=True)
    plugin.add_hook(view.language_model, "forward_pre", _language_model_pre_hook, with_kwargs=True)
    if plugin.config.pre.anchor == "encoder_output":
        plugin.add_hook(view.projector, "forward_pre", _projector_anchor_hook)


def at_layer(
    plugin: nn.Module, layer_idx: int, hidden: torch.Tensor, vision_mask: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    state = kwargs.get(PRE_STATE)
    if state is None or not state["active"]:
        return hidden
    loss = pre_loss(plugin.pre_head, hidden, kwargs[PRE_ANCHOR], vision_mask)
    run = plugin.pre_run
    state["loss"] = run.last_loss = loss.detach()
    if torch.is_grad_enabled() and loss.requires_grad:
        _check_loss_scaling(run, hidden)
        hidden = InjectAuxLoss.apply(hidden, loss, run.coefficient(hidden.device))
    return hidden


def _projector_input_size(projector: nn.Module) -> int:
    first = next((m for m in projector.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ValueError("PRe anchor='encoder_output' needs a projector that starts with a Linear layer.")
    return first.in_features


def _check_loss_scaling(run: PReRun, hidden: torch.Tensor) -> None:
    device = hidden.device.type
    fp16 = hidden.dtype == torch.float16 or (
        torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    )
    if fp16 and not run.loss_scaler_declared:
        raise RuntimeError(
            "PRe is training in fp16, where the loss is usually scaled (GradScaler): the injected PRe gradient "
            "must be scaled the same way or its weight silently becomes weight / scale. Declare the scaler with "
            "`hf_normalign.set_loss_scaler(model, scaler)` (`None` if you do not scale the loss), or add "
            "`hf_normalign.NormAlignCallback()` to an HF/TRL Trainer, which does it for you."
        )


# --- hooks (`ref` is a weak reference to the NormAlignModules) ---------------------------------------------------


def _pre_state(plugin: nn.Module, labels_given: bool) -> dict[str, Any]:
    return {"active": plugin.training or labels_given, "labels": labels_given}


def _root_pre_hook(ref, module, args, kwargs):
    # In place, returning None: `generate(compile_config=...)` compiles this hook as a frame of its own, and
    # returning `kwargs` would make its tensors outputs of that frame, guarded on their shapes (transformers 5.17
    # grows `mm_token_type_ids` by one each decode step: a recompile the unpatched model does not have).
    kwargs[PRE_STATE] = _pre_state(ref(), kwargs.get("labels") is not None)


def _input_pre_hook(ref, module, args, kwargs):
    if PRE_STATE not in kwargs:  # the inner model called directly (TRL's fused-loss forward): no labels reach it
        kwargs[PRE_STATE] = _pre_state(ref(), labels_given=False)
    return args, kwargs


def _root_post_hook(ref, module, args, kwargs, output):
    plugin = ref()
    state = kwargs.get(PRE_STATE) or {}
    loss = state.get("loss")
    if loss is None:
        return None
    # Detached: the PRe gradient is already injected at the PRe layer (see InjectAuxLoss).
    run = plugin.pre_run
    weighted = run.weight * run.grad_scale * run.loss_term_scale * loss
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


def _prime_output_classes(model: nn.Module) -> None:
    try:
        annotation = typing.get_type_hints(type(model).forward).get("return")
    except Exception:  # unresolvable annotations: the class is then made at the first eager forward
        return
    for candidate in typing.get_args(annotation) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, ModelOutput):
            _with_pre_loss(candidate)


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
