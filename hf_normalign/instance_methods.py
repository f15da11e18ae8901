"""The methods a patched model carries on its instance (``save_pretrained``, ``push_to_hub``): ``patch`` binds them
on the model it patches and ``unpatch`` removes them, so the model itself knows how to save its plugin.

A seam between two layers that must not import each other: :mod:`hf_normalign.patching` binds the methods, and
:mod:`hf_normalign.integrations.transformers` (which saves through :mod:`hf_normalign.persistence`, itself built on
patching) provides them when transformers is imported after ``import hf_normalign``, that is before any model
can be patched. Imports nothing, so the provider can reach it while other hf-normalign modules are half imported.

Example:
    >>> model = normalign.patch(tiny_model("llava"), methods="moca")      # doctest: +SKIP
    >>> "save_pretrained" in vars(model)                                  # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

_PROVIDED: dict[str, Callable[..., Any]] = {}


def provide(name: str, function: Callable[..., Any]) -> None:
    """Make ``patch`` bind ``function`` as ``model.<name>`` on every model it patches from now on."""
    _PROVIDED[name] = function


def bind(model: Any) -> None:
    """Bind the provided methods on ``model``'s instance dict. A method of that name that the model's owner has
    already set on the instance stays: it is theirs, and :func:`unbind` leaves it too.

    A bound method deep-copies rebound to the copy (``copy.deepcopy`` of the whole model, as TRL does for its
    reference model), so a copy saves its own plugin."""
    for name, function in _PROVIDED.items():
        vars(model).setdefault(name, MethodType(function, model))


def unbind(model: Any) -> None:
    """Remove exactly what :func:`bind` put on ``model``."""
    for name, function in _PROVIDED.items():
        method = vars(model).get(name)
        if isinstance(method, MethodType) and method.__func__ is function and method.__self__ is model:
            del vars(model)[name]
