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
from typing import Any

from transformers import TrainerCallback

from ..diagnostics import EncodedSample, MIRResult, mir, prepare_probe
from .step_log import add_to_step_log, run_before_reporters

__all__ = ["MIRCallback"]


class MIRCallback(TrainerCallback):
    """Compute MIR every ``every_n_steps`` optimizer steps on a fixed probe subset and log it as ``mir``.

    The probe (default: the built-in one) is sampled (``num_samples``, ``seed``) and encoded once, at
    the start of training, so every evaluation sees the same pairs. The model runs in eval mode for
    the measurement and returns to train mode after it.

    ``mir`` (and with ``log_per_layer`` each layer's FID as ``mir_fid/layer_k``) is logged with the
    loss of the step it was measured at: the Trainer logs at that step even between ``logging_steps``.
    It lands in ``trainer.state.log_history`` and reaches the console and every reporting integration
    (TensorBoard, W&B, ...).

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
        _require_int("every_n_steps", every_n_steps, minimum=1)
        if num_samples is not None:
            _require_int("num_samples", num_samples, minimum=2, why=" (MIR needs at least 2 image-text pairs)")
        _require_int("batch_size", batch_size, minimum=1)
        _require_int("seed", seed, minimum=0)
        if early_stopping_patience is not None:
            _require_int("early_stopping_patience", early_stopping_patience, minimum=1, why=" (or None)")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta):
            raise ValueError(f"MIRCallback: min_delta must be a finite number >= 0, got {min_delta!r}")
        if min_delta < 0:
            raise ValueError(
                f"MIRCallback: min_delta must be >= 0, got {min_delta!r}: a negative margin would count a rising MIR "
                "as an improvement"
            )
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
        self._unlogged: dict[str, float] = {}  # measured at this step, for the step's log

    def on_train_begin(self, args, state, control, processing_class=None, **kwargs):
        run_before_reporters(self)
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
        self._unlogged = {"mir": result.mir}
        if self.log_per_layer:
            per_layer = zip(result.layers, result.per_layer, strict=True)
            self._unlogged |= {f"mir_fid/layer_{k}": fid for k, fid in per_layer}
        control.should_log = True  # on every process: the Trainer's log gathers the loss across them
        if self.early_stopping_patience is not None:
            if result.mir < self.best - self.min_delta:
                self.best, self.evaluations_without_improvement = result.mir, 0
            else:
                self.evaluations_without_improvement += 1
            if self.evaluations_without_improvement >= self.early_stopping_patience:
                control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self._unlogged:
            add_to_step_log(state, logs, self._unlogged)
            self._unlogged = {}


def _require_int(name: str, value: Any, *, minimum: int, why: str = "") -> None:
    """``ValueError`` naming the argument unless `value` is an int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MIRCallback: {name} must be an integer >= {minimum}{why}, got {value!r}")
