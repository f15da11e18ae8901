"""hf_normalign's dependency-free modules (config, checkpoint format, method layers), loaded without the package's
``__init__``.

``import hf_normalign.config`` would first run ``hf_normalign/__init__.py``, which imports peft, bitsandbytes and
transformers' Trainer and patches ``from_pretrained``: too heavy for each of vLLM's processes. The few files the
plugin needs import only the standard library and torch, so they are loaded by path as standalone modules: the
plugin builds the very classes that training used, not copies of them.

``SOURCES`` is the one place that names those files and what the plugin takes from each. If hf_normalign's
modules move or change, :func:`get` raises :class:`SourceMovedError` naming the file, the missing name and this
table; ``tests/test_serving_checkpoint.py::test_every_source_loads`` checks the table in the main environment::

    ProjectorLayerNorm = core.get("projector_norm", "ProjectorLayerNorm")
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

# name -> (path inside the hf_normalign package, the attributes the plugin uses from it)
SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "config": ("config.py", ("NormAlignConfig",)),
    "format": ("persistence/format.py", ("validate", "SchemaError", "CONFIG_NAME", "WEIGHTS_NAME", "file_sha256")),
    "moca": ("methods/moca.py", ("MoCaLayer", "moca_key")),
    "projector_norm": ("methods/projector_norm.py", ("ProjectorLayerNorm",)),
}


class SourceMovedError(ImportError):
    """A file or name of ``SOURCES`` is not where the plugin expects it in the installed hf_normalign."""


def _package_dir() -> str:
    spec = importlib.util.find_spec("hf_normalign")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("normalign_vllm needs hf-normalign installed: pip install 'hf-normalign[vllm]'.")
    return next(iter(spec.submodule_search_locations))


@functools.cache
def load(name: str) -> ModuleType:
    """The ``SOURCES[name]`` file of the installed hf_normalign as a standalone module (cached)."""
    relative, _ = SOURCES[name]
    path = os.path.join(_package_dir(), relative)
    fix = f"update SOURCES in {__file__} to hf_normalign's current layout"
    if not os.path.isfile(path):
        raise SourceMovedError(f"hf-normalign's vLLM plugin loads {path}, which does not exist: {fix}.")
    module_name = f"_normalign_standalone_{name}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class body runs
    try:
        module_spec.loader.exec_module(module)
    except ImportError as err:  # e.g. a relative import added to the file: it is no longer standalone
        del sys.modules[module_name]
        raise SourceMovedError(
            f"{path} no longer loads on its own ({err}); the plugin needs it to import only the standard library "
            f"and torch. Move what it imports into SOURCES or {fix}."
        ) from err
    return module


def get(name: str, attribute: str) -> Any:
    """``attribute`` of the ``SOURCES[name]`` file, e.g. ``get("moca", "MoCaLayer")``."""
    relative, attributes = SOURCES[name]
    if attribute not in attributes:
        raise KeyError(f"{attribute!r} is not listed for {relative} in normalign_vllm.core.SOURCES; add it there.")
    module = load(name)
    if not hasattr(module, attribute):
        raise SourceMovedError(
            f"{module.__file__} has no {attribute!r} any more; update SOURCES in {__file__} to hf_normalign's "
            "current layout."
        )
    return getattr(module, attribute)
