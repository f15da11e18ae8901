"""Finding the transformers Trainer that runs a callback (callbacks receive no reference to it)."""

from __future__ import annotations

import inspect
from typing import Any


def calling_trainer() -> Any:
    """The transformers Trainer whose callback handler is running (nearest ``self`` up the stack), or None.

    Example:
        >>> def on_train_begin(self, args, state, control, **kwargs):   # in a TrainerCallback
        ...     trainer = calling_trainer()                              # doctest: +SKIP
    """
    from transformers import Trainer

    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            return owner
        frame = frame.f_back
    return None
