"""LLaVA / LLaVA-1.5 (`LlavaForConditionalGeneration`)."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._layouts import LLAVA_STYLE
from ._tiny import IMAGE_ID, IMAGE_SPECIALS, VIT, text

SPEC = ArchitectureSpec(
    model_type="llava",
    **LLAVA_STYLE,
    tiny=TinyRecipe(
        config={
            "text_config": text("llama"),
            "vision_config": {"model_type": "clip_vision_model", **VIT},
            "image_token_id": IMAGE_ID,
        },
        specials=IMAGE_SPECIALS,
        prompt_image="<image>",
        image_tokens="vit",
        image_block="plain",
        pixels="flat",
        processor="llava",
        vision_cls=True,
        processor_classes=("LlavaProcessor", "CLIPImageProcessorPil"),
    ),
)
