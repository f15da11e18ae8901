"""Mistral 3 (Pixtral vision encoder, patch merger inside the projector)."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._layouts import LLAVA_STYLE
from ._tiny import IMAGE_ID, IMG_END_ID, IMG_SEP_ID, VIT, text

SPEC = ArchitectureSpec(
    model_type="mistral3",
    **LLAVA_STYLE,
    tiny=TinyRecipe(
        config={
            "text_config": text("mistral"),
            "vision_config": {"model_type": "pixtral", **VIT, "head_dim": 32},
            "image_token_id": IMAGE_ID,
            "spatial_merge_size": 2,
        },
        specials={
            "image_token": ("[IMG]", IMAGE_ID),
            "image_break_token": ("[IMG_BREAK]", IMG_SEP_ID),
            "image_end_token": ("[IMG_END]", IMG_END_ID),
        },
        prompt_image="[IMG]",
        image_tokens="merged",
        image_block="pixtral",
        pixels="sized",
        processor="pixtral",
        processor_classes=("PixtralProcessor", "PixtralImageProcessorPil"),
    ),
)
