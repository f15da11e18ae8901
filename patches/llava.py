"""LLaVA / LLaVA-1.5 (`LlavaForConditionalGeneration`)."""

from hf_normalign.registry import ArchitectureSpec, register_architecture

from ._layouts import LLAVA_STYLE

SPEC = register_architecture(ArchitectureSpec(model_type="llava", **LLAVA_STYLE))
