"""Every hook hf-normalign puts into transformers, in one place.

Global (on classes, installed by :func:`install` as soon as transformers is imported after ``import hf_normalign``):

- ``from_pretrained`` of ``PreTrainedModel`` and of the Auto classes: load-time patching of aligned checkpoints;
- the Trainer's checkpoint loading (resume, ``load_best_model_at_end``): the Trainer reads ``model.safetensors``
  only, so the plugin weights in ``normalign.safetensors`` are restored after it (and a checkpoint of a patched
  model without them is refused before anything loads). No hook on the model or a callback runs at that point;
- ``PreTrainedModel.save_pretrained``, as a guard only: an unpatched model saved over an aligned checkpoint takes
  the folder's writer lock and removes the plugin files there, which belong to the earlier weights. A model that
  was never patched has nothing of ours on it, so only the class sees that save. (Telling such files apart on
  load instead would need the SHA-256 of the base weights in ``normalign_config.json``: a format change, and
  gigabytes hashed at every save and load.)

Per instance (bound by ``hf_normalign.patch``, removed by ``unpatch``, via :mod:`hf_normalign.instance_methods`):
:func:`save_pretrained` and :func:`push_to_hub`, which a patched model carries as its own. A patched save runs
transformers' own class ``save_pretrained`` (the guard skipped) into a staging folder, then writes the plugin files.

This module is imported by transformers' post-import hook, possibly while another hf-normalign module is half
imported (the one whose import imported transformers): at module level it imports no hf-normalign module but the
leaf :mod:`hf_normalign.instance_methods`, and each function imports what it uses when it runs.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import wrapt

from .. import instance_methods

logger = logging.getLogger(__name__)

# Auto classes that map the supported VLMs; their `from_pretrained` is a per-class copy, so each is wrapped.
AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForMultimodalLM")

RESUME_WITHOUT_PLUGIN_ENV = "HF_NORMALIGN_RESUME_WITHOUT_PLUGIN"


def install() -> None:
    """Install the class-level hooks and provide the instance methods (idempotent).

    Run by ``import hf_normalign`` when transformers is imported (at once if it already is); models that are not
    patched, and checkpoints without ``normalign_config.json``, behave exactly as without hf-normalign. The
    Trainer's hooks are installed when ``transformers.trainer`` is imported (lazily: it is costly).

    Example:
        >>> from hf_normalign.integrations import transformers as integration
        >>> integration.install()   # already done by `import hf_normalign`; a second call changes nothing
    """
    import transformers
    from transformers import PreTrainedModel

    _wrap_once(PreTrainedModel, "from_pretrained", from_pretrained_wrapper)
    for name in AUTO_CLASSES:
        auto_class = getattr(transformers, name, None)
        if auto_class is not None:
            _wrap_once(auto_class, "from_pretrained", from_pretrained_wrapper)
    _wrap_once(PreTrainedModel, "save_pretrained", unpatched_save_guard)
    instance_methods.provide("save_pretrained", save_pretrained)
    instance_methods.provide("push_to_hub", push_to_hub)
    wrapt.register_post_import_hook(_install_trainer, "transformers.trainer")


def _install_trainer(module: Any) -> None:
    _wrap_once(module.Trainer, "_load_from_checkpoint", resume_wrapper)
    _wrap_once(module.Trainer, "_load_best_model", best_model_wrapper)


def _is_ours(attribute: Any) -> bool:
    return isinstance(attribute, wrapt.FunctionWrapper) and getattr(attribute._self_wrapper, "_hf_normalign", False)


def _wrap_once(owner: type, name: str, wrapper: Callable[..., Any]) -> None:
    if not _is_ours(inspect.getattr_static(owner, name)):
        wrapper._hf_normalign = True  # type: ignore[attr-defined]
        wrapt.wrap_function_wrapper(owner, name, wrapper)


def _transformers_method(model: Any, name: str) -> Callable[..., Any]:
    """``model``'s class method ``name`` as transformers defines it, bound to ``model``: the instance's own method
    and hf-normalign's class-level guard skipped."""
    function = next(vars(cls)[name] for cls in type(model).__mro__ if name in vars(cls))
    if _is_ours(function):
        function = function.__wrapped__
    return function.__get__(model, type(model))


# --- the instance methods of a patched model ---------------------------------------------------------------------


def save_pretrained(model: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.save_pretrained`` of a patched model: transformers' signature, the aligned layout, atomically.

    ``push_to_hub=True`` (with ``repo_id=``, ``commit_message=``, ``create_pr=``, ``private=``) uploads the
    finished folder with :func:`hf_normalign.push_to_hub`. A ``distributed_checkpoint`` (DCP, for resuming
    training) keeps the whole module tree, plugin included, as transformers writes it.

    Example:
        >>> normalign.patch(model, methods="moca").save_pretrained("aligned")   # doctest: +SKIP
    """
    from ..hub import push_to_hub as push
    from ..patching import get_plugin
    from ..persistence.save import save_aligned

    if get_plugin(model) is None:  # the plugin was taken off by hand: a plain save, guard included
        return type(model).save_pretrained(model, *args, **kwargs)
    save = _transformers_method(model, "save_pretrained")
    bound = inspect.signature(save).bind(*args, **kwargs)
    arguments = bound.arguments
    save_directory = os.fspath(arguments["save_directory"])
    if arguments.get("distributed_checkpoint") or os.path.isfile(save_directory):
        return save(*args, **kwargs)  # DCP keeps the plugin in the tree; a file path gets transformers' own error
    extra = arguments.setdefault("kwargs", {})
    to_hub = arguments.pop("push_to_hub", False)
    hub_options = {key: extra.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private") if key in extra}
    result = save_aligned(model, save, bound)
    if to_hub:
        repo_id = hub_options.pop("repo_id", os.path.basename(os.path.realpath(save_directory)))
        push(save_directory, repo_id, token=arguments.get("token"), **hub_options)
    return result


def push_to_hub(model: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.push_to_hub`` of a patched model: transformers' signature, the aligned files and the hf-normalign
    model card (:func:`hf_normalign.push_to_hub`)."""
    from ..hub import push_to_hub as push

    signature = inspect.signature(_transformers_method(model, "push_to_hub"))
    arguments = signature.bind(*args, **kwargs).arguments
    extra = {
        key: value
        for name, parameter in signature.parameters.items()
        if parameter.kind is parameter.VAR_KEYWORD
        for key, value in arguments.pop(name, {}).items()
    }
    if extra:  # older transformers take (deprecated) keyword options that an aligned upload has no use for
        raise TypeError(f"push_to_hub of a patched model: unexpected options {sorted(extra)}.")
    return push(model, **arguments)


# --- the global hooks ----------------------------------------------------------------------------------------


def unpatched_save_guard(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    """``PreTrainedModel.save_pretrained``: an unpatched model over an aligned checkpoint drops the stale plugin files
    (:func:`hf_normalign.persistence.save.save_unpatched`); every other save is transformers' own."""
    from ..patching import get_plugin
    from ..persistence.format import CONFIG_NAME
    from ..persistence.save import save_unpatched

    if get_plugin(instance) is not None:  # a patched model saved through the class (its own method bypassed)
        return save_pretrained(instance, *args, **kwargs)
    arguments = inspect.signature(wrapped).bind(*args, **kwargs).arguments
    save_directory = os.fspath(arguments["save_directory"])
    if arguments.get("is_main_process", True) and os.path.isfile(os.path.join(save_directory, CONFIG_NAME)):
        return save_unpatched(save_directory, lambda: wrapped(*args, **kwargs))
    return wrapped(*args, **kwargs)


def from_pretrained_wrapper(wrapped: Callable[..., Any], cls: type, args: tuple, kwargs: dict) -> Any:
    """Load-time patching for transformers' ``from_pretrained`` (family classes and auto classes)."""
    from ..persistence.load import find_config, load_aligned
    from ..persistence.switch import autoload_enabled, base_load, loading_base

    if loading_base() or not autoload_enabled():
        return wrapped(*args, **kwargs)
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    config_path = find_config(source, kwargs)
    if config_path is None:
        with base_load():  # an auto class calls the family class: look up once
            return wrapped(*args, **kwargs)
    if "pretrained_model_name_or_path" in kwargs:
        kwargs = dict(kwargs)
        del kwargs["pretrained_model_name_or_path"]
    return load_aligned(os.fspath(source), config_path, wrapped, args[1:], kwargs)


def resume_wrapper(wrapped: Callable[..., Any], trainer: Any, args: tuple, kwargs: dict) -> Any:
    """``Trainer._load_from_checkpoint``: the plugin is in ``normalign.safetensors``, not ``model.safetensors``.

    A checkpoint without that file is refused before anything is loaded (the run would go on with the plugin
    as it is now, e.g. freshly initialised), unless ``HF_NORMALIGN_RESUME_WITHOUT_PLUGIN=1`` says so on purpose.
    """
    arguments = inspect.signature(wrapped).bind(*args, **kwargs).arguments
    model, checkpoint = arguments.get("model") or trainer.model, arguments["resume_from_checkpoint"]
    _require_plugin_file(model, checkpoint, "resume from")
    result = wrapped(*args, **kwargs)
    _restore_plugin(model, checkpoint)
    return result


def best_model_wrapper(wrapped: Callable[..., Any], trainer: Any, args: tuple, kwargs: dict) -> Any:
    """``Trainer._load_best_model`` (``load_best_model_at_end``): the same for the best checkpoint."""
    _require_plugin_file(trainer.model, trainer.state.best_model_checkpoint, "load the best model from")
    result = wrapped(*args, **kwargs)
    _restore_plugin(trainer.model, trainer.state.best_model_checkpoint)
    return result


def _require_plugin_file(model: Any, checkpoint: str | None, action: str) -> None:
    """Refuse a Trainer checkpoint of a patched model that lacks the plugin weights (the opt-out is logged)."""
    from accelerate.utils.constants import FSDP_MODEL_NAME

    from ..patching import get_plugin
    from ..persistence.format import WEIGHTS_NAME, NormAlignCheckpointError

    if not checkpoint or get_plugin(model) is None or os.path.isfile(os.path.join(checkpoint, WEIGHTS_NAME)):
        return
    if any(name.startswith(FSDP_MODEL_NAME) for name in os.listdir(checkpoint)):
        return  # an FSDP checkpoint holds the whole module tree, plugin included, and loads it as such
    env = os.environ.get(RESUME_WITHOUT_PLUGIN_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        logger.warning(
            f"{checkpoint} has no {WEIGHTS_NAME}; {RESUME_WITHOUT_PLUGIN_ENV}={env}: going on with the hf-normalign "
            "plugin weights the model has now."
        )
        return
    raise NormAlignCheckpointError(
        f"Cannot {action} {checkpoint}: the model is patched by hf-normalign but the checkpoint has no "
        f"{WEIGHTS_NAME}, so the plugin would silently restart from the weights it has now (its initialisation "
        f"for a fresh model). Restore the file from a copy of the checkpoint, or, to go on without it on purpose, "
        f"set {RESUME_WITHOUT_PLUGIN_ENV}=1. (PEFT checkpoints hold only the adapter unless the plugin is saved "
        "beside it: hf_normalign.integrations.trl.trl_kwargs or NormAlignCallback do that.)"
    )


def _restore_plugin(model: Any, checkpoint: str | None) -> None:
    from ..patching import get_plugin
    from ..persistence.format import WEIGHTS_NAME
    from ..persistence.load import load_plugin_weights

    if checkpoint and get_plugin(model) is not None and os.path.isfile(os.path.join(checkpoint, WEIGHTS_NAME)):
        load_plugin_weights(model, checkpoint)
