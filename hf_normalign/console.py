"""What a ``normalign`` command prints: its results on stdout, everything else on stderr.

While :func:`command_output` is active (``normalign`` runs each command inside it), ``sys.stdout`` is stderr, so a
library that prints to stdout (DeepSpeed's logger does, on import) cannot mix its lines into the results; the
command writes its results with :func:`emit`, which goes to the real stdout. Python warnings are shown as one line
``normalign COMMAND: warning: ...`` instead of Python's file-and-line form. Imports nothing from hf-normalign.

Example:
    >>> with command_output("normalign demo"):
    ...     emit("a result")          # stdout
    ...     print("library chatter")  # stderr
    a result
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, TextIO

_RESULTS: ContextVar[TextIO | None] = ContextVar("normalign_results", default=None)


def emit(*values: Any, sep: str = " ", end: str = "\n") -> None:
    """Print a command's result on stdout (as ``print``); outside :func:`command_output`, this is ``print``."""
    print(*values, sep=sep, end=end, file=_RESULTS.get() or sys.stdout, flush=True)


def one_line_text(text: str, limit: int = 600) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show_warning(prog: str, message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    kind = "" if category is UserWarning else f"{category.__name__}: "
    print(f"{prog}: warning: {kind}{one_line_text(str(message))}", file=sys.stderr)


@contextlib.contextmanager
def command_output(prog: str) -> Iterator[None]:
    """Results (:func:`emit`) on stdout, everything else printed on stderr, each warning as one line."""
    token = _RESULTS.set(sys.stdout)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.showwarning = functools.partial(_show_warning, prog)
            yield
    finally:
        _RESULTS.reset(token)
