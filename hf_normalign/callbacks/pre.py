"""NormAlignCallback: keep the PRe weight right under gradient accumulation and fp16 loss scaling, log the PRe loss."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, TrainerCallback

from ..methods import pre
from ..patching import get_plugin, set_loss_scaler
from .adapter_files import save_plugin_with_adapter
from .stack import calling_trainer
from .step_log import add_to_step_log, run_before_reporters


class NormAlignCallback(TrainerCallback):
    """Add to any HF (or TRL) Trainer training a model patched with PRe.

    The PRe gradient is injected at its decoder layer (so trainers that build their own loss
    from the logits still get it), which bypasses the Trainer's division of the loss by the
    gradient-accumulation steps. This callback scales the injected gradient by
    ``1 / gradient_accumulation_steps`` so accumulation 2 x batch b updates like accumulation
    1 x batch 2b, declares the Trainer's fp16 loss scaler (see `set_loss_scaler`), and logs the
    mean unweighted PRe loss as ``pre_loss`` next to ``loss`` (averaged over processes, like ``loss``).
    For any patched model it also refuses, when training begins, a DeepSpeed ZeRO-3 engine that saves without
    gathering the weights: its checkpoints would hold no hf-normalign weights.

    When training begins it refuses a model that is not patched (the callback would do nothing) and a plugin
    with frozen parameters (``peft.get_peft_model`` and TRL's ``peft_config`` freeze them): by then the Trainer
    has built its optimizer, so they would never train. Call ``hf_normalign.mark_plugin_trainable(peft_model)``
    before building the Trainer, or use ``hf_normalign.integrations.trl.trl_kwargs`` with TRL; pass
    ``allow_frozen_plugin=True`` to keep a frozen plugin on purpose. On a PEFT model it makes
    ``save_pretrained`` (``save_model()``, every ``checkpoint-N``) write the plugin files beside the adapter, which
    resuming restores.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[normalign.NormAlignCallback()])
        ... # doctest: +SKIP
    """

    def __init__(self, *, allow_frozen_plugin: bool = False) -> None:
        if not isinstance(allow_frozen_plugin, bool):
            raise TypeError(f"allow_frozen_plugin must be True or False, got {allow_frozen_plugin!r}")
        self.allow_frozen_plugin = allow_frozen_plugin
        self._step = [0.0, 0]  # sum and count of this optimizer step's PRe values (one per micro-batch)
        self._logged = [0.0, 0]  # the same since the last log, over every process

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        plugin = get_plugin(model) if model is not None else None
        if plugin is None:
            raise ValueError(
                "NormAlignCallback was given a model that is not patched by hf-normalign, so it has nothing to do "
                "and the run would train the plain model. Patch it first (hf_normalign.patch(model, methods=...)) "
                "or leave the callback out (e.g. for a baseline run)."
            )
        frozen = [name for name, p in plugin.named_parameters() if not p.requires_grad]
        if frozen and not self.allow_frozen_plugin:
            raise ValueError(
                f"{len(frozen)} of {len(list(plugin.parameters()))} hf-normalign plugin tensors are frozen "
                f"(requires_grad=False: {', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}), so they would "
                "never train: PEFT freezes them (get_peft_model, or TRL's peft_config), and the Trainer has built its "
                "optimizer before this check. Call hf_normalign.mark_plugin_trainable(peft_model) before creating the "
                "Trainer; with TRL and peft_config, pass **hf_normalign.integrations.trl.trl_kwargs(model, 'sft', "
                "peft_config=...) instead. To keep them frozen on purpose: NormAlignCallback(allow_frozen_plugin=True)."
            )
        if hasattr(model, "peft_config") and not isinstance(model, PreTrainedModel):  # a PeftModel: adapter-only saves
            save_plugin_with_adapter(model)
        run_before_reporters(self)  # `pre_loss` is printed and reported with `loss`
        _check_zero3_saves_weights(calling_trainer())
        if plugin.config.pre is not None and args.fp16 and args.deepspeed:
            raise ValueError(
                "PRe with DeepSpeed fp16 is not supported: DeepSpeed scales the loss with its own scaler, which "
                "the injected PRe gradient cannot follow. Train with bf16=True instead of fp16=True."
            )
        run = pre.run_state(plugin)
        if run is not None:
            run.loss_term_scale = 1.0 / _trainer_loss_multiplier(args)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # The factors above belong to this Trainer's run: a later forward outside it gets the plain model back.
        run = pre.run_state(get_plugin(model) if model is not None else None)
        if run is not None:
            run.end_training_run()

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        run = pre.run_state(get_plugin(model) if model is not None else None)
        if run is not None:
            run.grad_scale = 1.0 / args.gradient_accumulation_steps
            # accelerate's AcceleratedOptimizer carries the GradScaler of fp16 mixed precision (None otherwise).
            set_loss_scaler(model, getattr(optimizer, "scaler", None))

    def _collect(self, model) -> None:
        run = pre.run_state(get_plugin(model) if model is not None else None)
        if run is not None and run.last_loss is not None:
            self._step[0] += float(run.last_loss)
            self._step[1] += 1

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._collect(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._collect(model)
        step = self._step
        plugin = get_plugin(model) if model is not None else None
        if plugin is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Summed over processes here, where every process takes part (logging may run on the main one only).
            totals = torch.tensor(step, dtype=torch.float64, device=next(plugin.parameters()).device)
            torch.distributed.all_reduce(totals)
            step = totals.tolist()
        self._logged = [self._logged[0] + step[0], self._logged[1] + step[1]]
        self._step = [0.0, 0]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self._logged[1]:
            add_to_step_log(state, logs, {"pre_loss": self._logged[0] / self._logged[1]})
            self._logged = [0.0, 0]


def _check_zero3_saves_weights(trainer) -> None:
    """Refuse at the start what would fail at the first checkpoint: a DeepSpeed ZeRO-3 engine that saves without
    gathering the weights hands ``save_pretrained`` none, and the plugin's own parameters are empty placeholders."""
    engine = getattr(trainer, "model_wrapped", None)
    if not callable(getattr(engine, "zero_gather_16bit_weights_on_model_save", None)):
        return  # not a DeepSpeed engine
    if engine.zero_optimization_stage() == 3 and not engine.zero_gather_16bit_weights_on_model_save():
        raise ValueError(
            "DeepSpeed ZeRO-3 is set to save without gathering the weights, so the checkpoints would hold no "
            "hf-normalign weights. Set accelerate's `zero3_save_16bit_model: true` (DeepSpeed config "
            "`stage3_gather_16bit_weights_on_model_save: true`), as "
            "hf_normalign/recipes/accelerate/deepspeed_zero3.yaml does."
        )


def _trainer_loss_multiplier(args) -> int:
    """What the running HF Trainer multiplies a model's own loss by before logging it: ``num_processes`` when it
    averages tokens across devices for a model that takes ``num_items_in_batch`` (1 otherwise, and outside a
    Trainer)."""
    trainer = calling_trainer()
    if trainer is None or not getattr(args, "average_tokens_across_devices", False):
        return 1
    if not (getattr(trainer, "model_accepts_loss_kwargs", False) or getattr(trainer, "compute_loss_func", None)):
        return 1
    if args.n_gpu > 1:
        return args.n_gpu
    return max(1, trainer.accelerator.num_processes // trainer.get_tp_size())
