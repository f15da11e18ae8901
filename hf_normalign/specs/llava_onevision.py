"""LLaVA-OneVision: images and videos; `image_newline` tokens count as vision positions."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._build import LLAVA_ONEVISION_BUILD
from ._layouts import LLAVA_STYLE
from ._tiny import IMAGE_ID, IMAGE_SPECIALS, PINPOINTS, VIDEO_ID, VIT, text

SPEC = ArchitectureSpec(
    model_type="llava_onevision",
    **LLAVA_STYLE,
    vision_grid="overview_tile",
    video_token_attr="video_token_id",
    build=LLAVA_ONEVISION_BUILD,
    tiny=TinyRecipe(
        config={
            "text_config": text("qwen2"),
            "vision_config": {"model_type": "siglip_vision_model", **VIT},
            "image_token_id": IMAGE_ID,
            "video_token_id": VIDEO_ID,
            "image_grid_pinpoints": PINPOINTS,
        },
        specials={**IMAGE_SPECIALS, "video_token": ("<video>", VIDEO_ID)},
        prompt_image="<image>",
        image_tokens="anyres_overview",
        image_block="plain",
        pixels="anyres_batched",
        processor="onevision",
        processor_classes=("LlavaOnevisionProcessor", "LlavaOnevisionImageProcessorPil"),
    ),
)
