"""Adding a callback's values to the Trainer's step log, where the console printer and the reporting
integrations (TensorBoard, W&B, ...) see them."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerState

from .stack import calling_trainer


def run_before_reporters(callback: TrainerCallback) -> None:
    """Move `callback` to the front of the calling Trainer's callbacks.

    The Trainer puts its printer and reporting integrations before the user's callbacks, and each reads ``logs``
    in its own ``on_log``: only a callback that runs first can add to what they report. Called from
    ``on_train_begin``; the handler's list is replaced, not edited, as the handler is iterating over it."""
    trainer = calling_trainer()
    if trainer is not None:
        handler = trainer.callback_handler
        handler.callbacks = [callback, *(c for c in handler.callbacks if c is not callback)]


def add_to_step_log(state: TrainerState, logs: dict[str, Any], values: dict[str, Any]) -> None:
    """Add `values` to the step's ``logs`` (which the callbacks after this one report) and to the copy the Trainer
    has already stored as the last entry of ``state.log_history``."""
    logs.update(values)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(values)
