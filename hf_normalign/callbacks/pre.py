"""NormAlignCallback: keep the PRe weight right under gradient accumulation and fp16 loss scaling, log the PRe loss."""

from __future__ import annotations

from transformers import TrainerCallback

from ..patching import get_plugin, set_loss_scaler


class NormAlignCallback(TrainerCallback):
    """Add to any HF (or TRL) Trainer training a model patched with PRe.

    The PRe gradient is injected at its decoder layer (so trainers that build their own loss
    from the logits still get it), which bypasses the Trainer's division of the loss by the
    gradient-accumulation steps. This callback scales the injected gradient by
    ``1 / gradient_accumulation_steps`` so accumulation 2 x batch b updates like accumulation
    1 x batch 2b, declares the Trainer's fp16 loss scaler (see `set_loss_scaler`), and logs the
    mean unweighted PRe loss as ``pre_loss`` next to ``loss``.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[normalign.NormAlignCallback()])
        ... # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._pre_losses: list[float] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        plugin = get_plugin(model) if model is not None else None
        if plugin is not None and plugin.config.pre is not None and args.fp16 and args.deepspeed:
            raise ValueError(
                "PRe with DeepSpeed fp16 is not supported: DeepSpeed scales the loss with its own scaler, which "
                "the injected PRe gradient cannot follow. Train with bf16=True instead of fp16=True."
            )

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        plugin = get_plugin(model) if model is not None else None
        if plugin is not None:
            plugin.pre_grad_scale = 1.0 / args.gradient_accumulation_steps
            # accelerate's AcceleratedOptimizer carries the GradScaler of fp16 mixed precision (None otherwise).
            set_loss_scaler(model, getattr(optimizer, "scaler", None))

    def _collect(self, model) -> None:
        plugin = get_plugin(model) if model is not None else None
        if plugin is not None and plugin.last_pre_loss is not None:
            self._pre_losses.append(float(plugin.last_pre_loss))

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._collect(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._collect(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer has already stored a copy of `logs` in `state.log_history`: update both, so
        # `pre_loss` reaches the history and the reporting callbacks that run after this one.
        if logs is not None and "loss" in logs and self._pre_losses:
            logs["pre_loss"] = sum(self._pre_losses) / len(self._pre_losses)
            if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
                state.log_history[-1]["pre_loss"] = logs["pre_loss"]
            self._pre_losses.clear()
