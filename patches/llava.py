"""LLaVA / LLaVA-1.5 (`LlavaForConditionalGeneration`)."""

from hf_normalign.spec import ArchitectureSpec

from ._layouts import LLAVA_STYLE

SPEC = ArchitectureSpec(model_type="llava", **LLAVA_STYLE)
