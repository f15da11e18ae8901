"""HF Trainer callbacks, one module each: ``pre`` (:class:`NormAlignCallback`, PRe under gradient accumulation
and fp16) and ``mir`` (:class:`MIRCallback`, MIR during training). Imported on first use, so that
``NormAlignCallback`` does not load the diagnostics.

Example:
    >>> from hf_normalign.callbacks import MIRCallback, NormAlignCallback   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"MIRCallback": "mir", "NormAlignCallback": "pre"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = ["MIRCallback", "NormAlignCallback"]
