"""Qwen2-VL."""

from hf_normalign.registry import ArchitectureSpec, register_architecture

from ._layouts import QWEN_STYLE

SPEC = register_architecture(ArchitectureSpec(model_type="qwen2_vl", **QWEN_STYLE))
