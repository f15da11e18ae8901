"""Installs hf-normalign's wrappers on transformers' ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

Runs as soon as transformers is imported (a post-import hook registered by ``import hf_normalign``), which
can be in the middle of importing another hf-normalign module: so this module imports no other one, and each
wrapper imports ``hf_normalign.persistence.integration``, where the wrappers' logic lives, only when it is first
called.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import wrapt

# Auto classes that map the supported VLMs; their `from_pretrained` is a per-class copy, so each is wrapped.
AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForMultimodalLM")
INTEGRATION = "hf_normalign.persistence.integration"


def _forward(name: str) -> Callable[..., Any]:
    """A wrapt wrapper that calls ``hf_normalign.persistence.integration.<name>``."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        return getattr(importlib.import_module(INTEGRATION), name)(wrapped, instance, args, kwargs)

    wrapper._hf_normalign = True  # type: ignore[attr-defined]
    return wrapper


def _wrap_once(owner: type, name: str, wrapper_name: str) -> None:
    current = inspect.getattr_static(owner, name)
    if isinstance(current, wrapt.FunctionWrapper) and getattr(current._self_wrapper, "_hf_normalign", False):
        return
    wrapt.wrap_function_wrapper(owner, name, _forward(wrapper_name))


def _install_trainer(module: Any) -> None:
    _wrap_once(module.Trainer, "_load_from_checkpoint", "resume_wrapper")
    _wrap_once(module.Trainer, "_load_best_model", "best_model_wrapper")


def install() -> None:
    """Install the ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` wrappers (idempotent).

    Called when transformers is imported after ``import hf_normalign``; models that are not patched, and
    checkpoints without ``normalign_config.json``, behave exactly as without hf-normalign. The Trainer's
    checkpoint loading (resume, ``load_best_model_at_end``) is wrapped when ``transformers.trainer`` is
    imported, to restore the plugin weights as well.

    Example:
        >>> hf_normalign.persistence.install()   # already done by `import hf_normalign`   # doctest: +SKIP
    """
    import transformers
    from transformers import PreTrainedModel

    _wrap_once(PreTrainedModel, "save_pretrained", "save_wrapper")
    _wrap_once(PreTrainedModel, "from_pretrained", "from_pretrained_wrapper")
    _wrap_once(PreTrainedModel, "push_to_hub", "push_wrapper")
    for name in AUTO_CLASSES:
        auto_class = getattr(transformers, name, None)
        if auto_class is not None:
            _wrap_once(auto_class, "from_pretrained", "from_pretrained_wrapper")
    wrapt.register_post_import_hook(_install_trainer, "transformers.trainer")  # imported lazily: costly
