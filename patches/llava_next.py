"""LLaVA-NeXT: the `image_newline` tokens after the projector output count as vision positions."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._layouts import LLAVA_STYLE
from ._tiny import IMAGE_ID, IMAGE_SPECIALS, PINPOINTS, VIT, text

SPEC = ArchitectureSpec(
    model_type="llava_next",
    **LLAVA_STYLE,
    tiny=TinyRecipe(
        config={
            "text_config": text("llama"),
            "vision_config": {"model_type": "clip_vision_model", **VIT},
            "image_token_id": IMAGE_ID,
            "image_grid_pinpoints": PINPOINTS,
        },
        specials=IMAGE_SPECIALS,
        prompt_image="<image>",
        image_tokens="anyres",
        image_block="plain",
        pixels="anyres",
        processor="llava",
        vision_cls=True,
        processor_classes=("LlavaNextProcessor", "LlavaNextImageProcessorPil"),
    ),
)
