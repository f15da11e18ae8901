"""The recipe's callbacks: ``NormAlignCallback`` (always, but for the baseline) and, with ``--mir_every``,
``MIRCallback``; and what the latter measured, for the model card of ``--push-to-hub``.

Usage::

    from hf_normalign.recipes.callbacks import latest_mir, recipe_callbacks
    trainer = Trainer(..., callbacks=recipe_callbacks(config, processor))
    mir = latest_mir(trainer)  # None when MIR was not measured
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback

import hf_normalign as normalign
from hf_normalign.recipes.config import RecipeConfig

__all__ = ["latest_mir", "recipe_callbacks"]


def recipe_callbacks(config: RecipeConfig, processor: Any) -> list[TrainerCallback]:
    """The callbacks a run of ``config`` trains with (the processor builds MIR's probe batches)."""
    # The baseline trains the unpatched model, which NormAlignCallback refuses (it would have nothing to do).
    callbacks: list[TrainerCallback] = [] if config.baseline else [normalign.NormAlignCallback()]
    if config.recipe.mir_every:
        from hf_normalign.callbacks import MIRCallback

        callbacks.append(
            MIRCallback(processor, every_n_steps=config.recipe.mir_every, num_samples=config.recipe.mir_samples)
        )
    return callbacks


def latest_mir(trainer: Trainer) -> Any:
    """The latest MIR that a ``MIRCallback`` of ``trainer`` measured (its ``results``), or None."""
    return next((c.results[-1][1] for c in trainer.callback_handler.callbacks if getattr(c, "results", None)), None)
