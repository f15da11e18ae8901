"""LLaVA-OneVision: images and videos; `image_newline` tokens count as vision positions."""

from hf_normalign.registry import ArchitectureSpec, register_architecture

from ._layouts import LLAVA_STYLE

SPEC = register_architecture(
    ArchitectureSpec(
        model_type="llava_onevision", **LLAVA_STYLE, video_token_attr="video_token_id", vision_grid="overview_tile"
    )
)
