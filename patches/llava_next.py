"""LLaVA-NeXT: the `image_newline` tokens after the projector output count as vision positions."""

from hf_normalign.registry import ArchitectureSpec, register_architecture

from ._layouts import LLAVA_STYLE

SPEC = register_architecture(ArchitectureSpec(model_type="llava_next", **LLAVA_STYLE, vision_grid="overview_tile"))
