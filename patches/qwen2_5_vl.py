"""Qwen2.5-VL."""

from hf_normalign.spec import ArchitectureSpec

from ._layouts import QWEN_STYLE

SPEC = ArchitectureSpec(model_type="qwen2_5_vl", **QWEN_STYLE)
