"""Keyword options that forward to an options dataclass: one default per option, stated in the dataclass.

A public metric (``mir``, ``modality_profile``, ...) takes ``options=`` (its dataclass, e.g. ``MIROptions``),
``run=`` (:class:`~.runner.RunOptions`) and, as before, each option as a keyword. A keyword's default is
:data:`UNSET`, meaning "the dataclass's value"; a keyword that is passed overrides the dataclass given (or the
default one), so ``mir(m, p, outliers="drop")`` and ``mir(m, p, options=MIROptions(outliers="drop"))`` are the
same call.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     size: int = 3
    >>> merge_options(Demo, None, size=UNSET), merge_options(Demo, Demo(5), size=UNSET)
    (Demo(size=3), Demo(size=5))
    >>> merge_options(Demo, Demo(5), size=7)
    Demo(size=7)
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["UNSET", "merge_options"]

T = TypeVar("T")


class _Unset:
    """The default of a keyword that forwards to an options dataclass (its value there applies)."""

    def __repr__(self) -> str:
        return "<the options' default>"

    def __reduce__(self) -> str:
        return "UNSET"  # one instance, also after pickling


UNSET: Any = _Unset()


def merge_options(cls: type[T], options: T | None, **given: Any) -> T:
    """``options`` (default ``cls()``) with every keyword of ``given`` that is not :data:`UNSET` replaced."""
    if options is not None and not isinstance(options, cls):
        raise TypeError(f"options must be a {cls.__name__}, got {type(options).__name__}")
    base = options if options is not None else cls()
    passed = {k: v for k, v in given.items() if v is not UNSET}
    return dataclasses.replace(base, **passed) if passed else base  # type: ignore[type-var]
