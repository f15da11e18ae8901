"""LLaVA-NeXT: the `image_newline` tokens after the projector output count as vision positions."""

from hf_normalign.spec import ArchitectureSpec

from ._layouts import LLAVA_STYLE

SPEC = ArchitectureSpec(model_type="llava_next", **LLAVA_STYLE)
