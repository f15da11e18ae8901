"""LLaVA-OneVision: images and videos; `image_newline` tokens count as vision positions."""

from hf_normalign.spec import ArchitectureSpec

from ._layouts import LLAVA_STYLE

SPEC = ArchitectureSpec(model_type="llava_onevision", **LLAVA_STYLE, video_token_attr="video_token_id")
