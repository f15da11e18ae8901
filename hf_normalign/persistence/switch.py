"""The load-time patching switch (:class:`autoload`) and the pass-through for hf-normalign's own base loads.

Shared by the loaders (:mod:`.load`), which load the base model through transformers' wrapped
``from_pretrained``, and the wrappers (:mod:`hf_normalign.integrations.transformers`), which must let those loads
through.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator
from contextlib import contextmanager

AUTOLOAD_ENV = "HF_NORMALIGN_AUTOLOAD"

_loading_base: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_normalign_loading_base", default=False)

_autoload_enabled = True


class autoload:
    """Switch load-time patching of transformers' ``from_pretrained`` on or off.

    Called plainly it sets the switch; used as a context manager it restores the previous setting on exit.
    The environment variable ``HF_NORMALIGN_AUTOLOAD=0`` switches it off as well (read at each load).

    Example:
        >>> with normalign.autoload(False):                                         # doctest: +SKIP
        ...     base = AutoModelForImageTextToText.from_pretrained("aligned")    # the base, unpatched
        >>> normalign.autoload(False)   # off from here on                         # doctest: +SKIP
    """

    def __init__(self, enabled: bool) -> None:
        global _autoload_enabled
        self._previous = _autoload_enabled
        _autoload_enabled = bool(enabled)

    def __repr__(self) -> str:
        return f"autoload(enabled={_autoload_enabled})"

    def __enter__(self) -> autoload:
        return self

    def __exit__(self, *exc: object) -> None:
        global _autoload_enabled
        _autoload_enabled = self._previous


def autoload_enabled() -> bool:
    """Whether transformers' ``from_pretrained`` patches aligned checkpoints right now."""
    env = os.environ.get(AUTOLOAD_ENV, "1").strip().lower()
    return _autoload_enabled and env not in ("0", "false", "no", "off")


@contextmanager
def base_load() -> Iterator[None]:
    """Inside: our own loads of the base model, which the load-time wrappers must pass through."""
    token = _loading_base.set(True)
    try:
        yield
    finally:
        _loading_base.reset(token)


def loading_base() -> bool:
    """Whether hf-normalign itself is loading a base model right now (inside :func:`base_load`)."""
    return _loading_base.get()
