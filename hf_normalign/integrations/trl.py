"""TRL (``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``) with a patched model, traps handled.

TRL trains a patched model as it is, except where it builds things on its own: with ``peft_config`` it
freezes every non-adapter parameter (the plugin's too) and saves only the adapter; its reference model
is reloaded from the config path (an in-memory patch is lost) or, with PEFT, is the policy with its
adapters disabled, which still runs the *trained* plugin. :func:`trl_kwargs` returns the arguments that
fix all of this for one trainer::

    import hf_normalign as normalign
    from hf_normalign.integrations.trl import trl_kwargs
    from trl import DPOConfig, DPOTrainer

    model = normalign.patch(model, methods=["projector_norm", "moca", "pre"])
    trainer = DPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds, processing_class=processor,
                         **trl_kwargs(model, "dpo", peft_config=LoraConfig(target_modules="all-linear")))
    trainer.train()

What the returned arguments do:

- ``callbacks``: a :class:`NormAlignTRLCallback`: keeps the PRe weight under gradient accumulation and logs
  ``pre_loss`` once per step from the policy pass (as :class:`~hf_normalign.NormAlignCallback`); with PEFT,
  makes the plugin trainable again, writes ``normalign_config.json`` + ``normalign.safetensors`` beside the
  adapter in ``save_model()`` and in every ``checkpoint-N`` (resuming restores them), and switches the plugin
  to its frozen initial weights while the adapters are disabled (TRL's reference pass); a reference model
  TRL reloaded from a path without the plugin is patched with the initial plugin. It raises at the start of
  training if a trainable plugin parameter is missing from the optimizer.
- ``peft_config``: a copy that keeps LoRA off the plugin's own Linears (``target_modules="all-linear"``).
- ``ref_model`` (DPO without PEFT): a frozen copy of the model with its initial plugin.

References never compute PRe: it changes no output, only adds a loss the reference does not train on.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..callbacks.adapter_files import save_plugin_with_adapter
from ..callbacks.pre import NormAlignCallback
from ..callbacks.stack import calling_trainer
from ..config import NormAlignConfig
from ..methods import pre
from ..modeling import get_base_model
from ..patching import get_config, get_plugin, patch, unpatch
from ..peft_utils import mark_plugin_trainable, plugin_lora_exclude_modules

__all__ = ["TRAINERS", "NormAlignTRLCallback", "reference_model", "trl_kwargs"]

TRAINERS: tuple[str, ...] = ("sft", "dpo", "grpo")


def trl_kwargs(model: nn.Module, trainer: str, *, peft_config: Any = None) -> dict[str, Any]:
    """Keyword arguments for a TRL trainer training the patched ``model``: ``callbacks`` and, where needed,
    ``peft_config`` and ``ref_model``. Call before building the trainer; pass extra callbacks beside them::

        kwargs = trl_kwargs(model, "sft", peft_config=LoraConfig(target_modules=["q_proj", "v_proj"]))
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor, **kwargs)

    Args:
        model: a patched model (not yet wrapped by PEFT).
        trainer: ``"sft"``, ``"dpo"`` or ``"grpo"``.
        peft_config: the ``peft.LoraConfig`` (or other ``PeftConfig``) you would give the trainer.
    """
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
    if get_plugin(model) is None:
        raise ValueError("trl_kwargs needs a model patched by hf-normalign: call hf_normalign.patch(model, ...) first.")
    if hasattr(model, "peft_config"):
        raise ValueError(
            "The model is already a PeftModel: pass the base model and peft_config=... so TRL wraps it (and the "
            "plugin stays out of the adapter)."
        )
    kwargs: dict[str, Any] = {"callbacks": [NormAlignTRLCallback(model)]}
    if peft_config is not None:
        kwargs["peft_config"] = _without_plugin(peft_config, model)
    elif trainer == "dpo":
        kwargs["ref_model"] = reference_model(model)
    return kwargs


def reference_model(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of ``model`` with its current plugin weights and without PRe (a training-only
    loss): the reference a preference trainer compares the policy against.

    Example:
        >>> ref = reference_model(patched_model)  # doctest: +SKIP
        >>> DPOTrainer(model=patched_model, ref_model=ref, ...)  # doctest: +SKIP
    """
    ref = copy.deepcopy(get_base_model(model))
    _repatch_without_pre(ref, get_config(ref), get_plugin(ref).state_dict())
    return ref.eval().requires_grad_(False)


def _repatch_without_pre(model: nn.Module, config: NormAlignConfig, state: dict[str, torch.Tensor]) -> None:
    """(Re)patch ``model`` with ``config`` minus PRe and load ``state`` (the PRe head left out)."""
    if get_plugin(model) is not None:
        unpatch(model)
    config = NormAlignConfig.from_dict({**config.to_dict(), "pre": None})
    if config.methods:
        patch(model, config, init_weights=False)
        get_plugin(model).load_state_dict({k: v for k, v in state.items() if not k.startswith("pre_head.")})


def _without_plugin(peft_config: Any, model: nn.Module) -> Any:
    """A copy of ``peft_config`` that keeps adapters off the plugin's Linears."""
    excluded = getattr(peft_config, "exclude_modules", None)
    if isinstance(excluded, str):
        raise ValueError(
            "peft_config.exclude_modules is a regex; pass a list of module names so hf-normalign can add the "
            f"plugin's modules {plugin_lora_exclude_modules(model)} to it."
        )
    if not hasattr(peft_config, "exclude_modules"):
        return peft_config  # prompt-learning configs put no layers on modules
    config = copy.copy(peft_config)
    config.exclude_modules = sorted({*(excluded or ()), *plugin_lora_exclude_modules(model)})
    return config


class NormAlignTRLCallback(NormAlignCallback):
    """The callback :func:`trl_kwargs` returns; build it on the patched model before the trainer wraps it.

    Snapshot of the plugin at construction = the reference's plugin (the initial weights).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        plugin = get_plugin(model)
        if plugin is None:
            raise ValueError("NormAlignTRLCallback needs a model patched by hf-normalign.")
        self._config = get_config(model)
        self._initial = {name: p.detach().clone() for name, p in plugin.named_parameters()}

    # --- set-up -------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and hasattr(model, "peft_config"):  # TRL wrapped it: PEFT froze the plugin
            mark_plugin_trainable(model)
            save_plugin_with_adapter(model)
            _AdapterReference(model, self._initial).install()
        return control

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, optimizer=optimizer, **kwargs)
        plugin = get_plugin(model)
        if optimizer is not None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [n for n, p in plugin.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
            if missing:
                raise RuntimeError(
                    f"The optimizer does not hold the trainable plugin parameters {missing[:4]}: they would never "
                    "change. Build the optimizer after hf_normalign.mark_plugin_trainable(model), or let the "
                    "trainer build it."
                )
        trainer = calling_trainer()
        ref = getattr(trainer, "ref_model", None)
        if ref is not None:
            self._patch_reference(trainer.accelerator.unwrap_model(ref))
        return control

    def _patch_reference(self, ref: nn.Module) -> None:
        """TRL reloaded the reference from the config path: give it the initial plugin (without PRe)."""
        if get_plugin(ref) is not None and get_plugin(ref).config.pre is None:
            return  # ours (reference_model) or an aligned checkpoint reloaded by load-time patching
        _repatch_without_pre(ref, self._config, self._initial)
        ref.eval().requires_grad_(False)


# --- PEFT: the reference pass runs the initial plugin -------------------------------------------------------


class _AdapterReference:
    """While the adapters of ``peft_model`` are disabled (or the ``"ref"`` adapter is active), forward passes run
    the plugin with its initial weights, and leave the policy's latest PRe loss as it was."""

    def __init__(self, peft_model: nn.Module, initial: dict[str, torch.Tensor]) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.base = get_base_model(peft_model)
        self.initial = initial
        self.layer = next((m for m in self.base.modules() if isinstance(m, BaseTunerLayer)), None)
        self.saved: dict[str, torch.Tensor] | None = None
        self.pre_loss: Any = None

    def install(self) -> None:
        if self.layer is None:
            return  # a prompt-learning adapter: disabling it does not go through tuner layers
        self.base.register_forward_pre_hook(self._enter, prepend=True)
        self.base.register_forward_hook(self._exit, always_call=True)

    def _is_reference(self) -> bool:
        return bool(self.layer.disable_adapters) or list(self.layer.active_adapters) == ["ref"]

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if not self._is_reference():
            return
        plugin = get_plugin(self.base)
        run = pre.run_state(plugin)
        self.pre_loss = None if run is None else run.last_loss
        # Swap the storage, not the values: tensors the policy pass saved for backward keep theirs.
        self.saved = {}
        for name, param in plugin.named_parameters():
            self.saved[name] = param.data
            param.data = self.initial[name]

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.saved is None:
            return
        plugin = get_plugin(self.base)
        for name, param in plugin.named_parameters():
            param.data = self.saved[name]
        run = pre.run_state(plugin)
        if run is not None:
            run.last_loss = self.pre_loss
        self.saved = None
