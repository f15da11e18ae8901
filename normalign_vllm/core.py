"""hf_normalign's dependency-free modules (config, method layers), loaded without the package's ``__init__``.

``import hf_normalign.config`` would first run ``hf_normalign/__init__.py``, which imports peft, bitsandbytes and
transformers' Trainer and patches ``from_pretrained``: too heavy for each of vLLM's processes. These files import
only the standard library and torch, so they are loaded by path as standalone modules instead: the plugin
computes with the very classes that training used, not with a copy of their formulas.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from types import ModuleType


@functools.cache
def load(relative_path: str) -> ModuleType:
    """Load ``hf_normalign/<relative_path>`` as a standalone module (cached), e.g. ``load("methods/moca.py")``."""
    spec = importlib.util.find_spec("hf_normalign")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("normalign_vllm needs hf-normalign installed: pip install 'hf-normalign[vllm]'.")
    path = os.path.join(next(iter(spec.submodule_search_locations)), relative_path)
    name = "_normalign_standalone_" + relative_path.removesuffix(".py").replace("/", "_")
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses look their module up while the class body runs
    module_spec.loader.exec_module(module)
    return module
