"""MIRCallback: MIR during HF Trainer training, logged like the loss, with optional early stopping.

Example:
    >>> from transformers import Trainer
    >>> import hf_normalign as normalign
    >>> cb = normalign.MIRCallback(processor, every_n_steps=200, early_stopping_patience=3, min_delta=0.01)
    ... # doctest: +SKIP
    >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[cb])  # doctest: +SKIP
    >>> trainer.train()  # "mir" appears in trainer.state.log_history, TensorBoard, W&B...  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from transformers import TrainerCallback

from ..diagnostics import EncodedSample, MIRResult, mir, prepare_probe
from .stack import calling_trainer

__all__ = ["MIRCallback"]


class MIRCallback(TrainerCallback):
    """Compute MIR every ``every_n_steps`` optimizer steps on a fixed probe subset and log it as ``mir``.

    The probe (default: the built-in one) is sampled (``num_samples``, ``seed``) and encoded once, at
    the start of training, so every evaluation sees the same pairs. The model runs in eval mode for
    the measurement and returns to train mode after it.

    Logging goes through ``Trainer.log``, so ``mir`` (and with ``log_per_layer`` each layer's FID as
    ``mir_fid/layer_k``) lands in ``trainer.state.log_history`` and reaches every reporting
    integration (TensorBoard, W&B, ...). The callback finds the Trainer that calls it at
    ``on_train_begin`` (on the call stack); call :meth:`set_trainer` to give it explicitly.

    Early stopping: with ``early_stopping_patience=p``, training stops once MIR has not improved (gone
    below the best value by more than ``min_delta``) for ``p`` consecutive evaluations. Lower MIR is
    better aligned.

    Args:
        processor: the model's processor; default: the Trainer's ``processing_class`` if it is one.
        probe: as :func:`hf_normalign.diagnostics.mir`.
        every_n_steps: evaluate when ``global_step`` is a multiple of this.
        num_samples, seed, batch_size: probe subset size, its seed, samples per forward pass.
        early_stopping_patience, min_delta: see above; ``None`` never stops.
        log_per_layer: also log the per-layer FIDs.
        **mir_kwargs: passed to :func:`~hf_normalign.diagnostics.mir` (``outliers``, ``final_norm``,
            ``layers``, ``sqrt``...).

    Attributes:
        results: ``(global_step, MIRResult)`` of every evaluation.
    """

    def __init__(
        self,
        processor: Any = None,
        probe: Any = None,
        *,
        every_n_steps: int = 200,
        num_samples: int | None = 100,
        batch_size: int = 8,
        seed: int = 0,
        early_stopping_patience: int | None = None,
        min_delta: float = 0.0,
        log_per_layer: bool = False,
        **mir_kwargs: Any,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if early_stopping_patience is not None and early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1 or None, got {early_stopping_patience}")
        self.processor = processor
        self.probe = probe
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.early_stopping_patience = early_stopping_patience
        self.min_delta = min_delta
        self.log_per_layer = log_per_layer
        self.mir_kwargs = {"progress": False, **mir_kwargs}
        self.results: list[tuple[int, MIRResult]] = []
        self.best = math.inf
        self.evaluations_without_improvement = 0
        self._samples: list[EncodedSample] | None = None
        self._trainer: Any = None

    def set_trainer(self, trainer: Any) -> MIRCallback:
        """Log through this Trainer (otherwise the one that calls the callback is found on the call stack)."""
        self._trainer = trainer
        return self

    def on_train_begin(self, args, state, control, processing_class=None, **kwargs):
        if self._trainer is None:
            self._trainer = calling_trainer()
        if self.processor is None and hasattr(processing_class, "image_processor"):
            self.processor = processing_class
        if self._samples is None:
            self._samples = prepare_probe(
                self.processor,
                self.probe,
                num_samples=self.num_samples,
                seed=self.seed,
                prompt=self.mir_kwargs.get("prompt"),
            )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every_n_steps != 0:
            return control
        result = mir(model, None, self._samples, num_samples=None, batch_size=self.batch_size, **self.mir_kwargs)
        self.results.append((state.global_step, result))
        logs = {"mir": result.mir}
        if self.log_per_layer:
            logs.update({f"mir_fid/layer_{k}": fid for k, fid in zip(result.layers, result.per_layer, strict=True)})
        if self._trainer is not None:
            self._trainer.log(logs)
        else:
            warnings.warn(
                "MIRCallback found no Trainer to log through (call set_trainer); 'mir' goes to state.log_history only",
                stacklevel=2,
            )
            state.log_history.append({**logs, "step": state.global_step})
        if self.early_stopping_patience is not None:
            if result.mir < self.best - self.min_delta:
                self.best, self.evaluations_without_improvement = result.mir, 0
            else:
                self.evaluations_without_improvement += 1
            if self.evaluations_without_improvement >= self.early_stopping_patience:
                control.should_training_stop = True
        return control
