"""InternVL, the transformers-native `InternVLForConditionalGeneration` (no remote code)."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._layouts import LLAVA_STYLE
from ._tiny import IMAGE_ID, IMG_END_ID, IMG_START_ID, VIDEO_ID, VIT, text

SPEC = ArchitectureSpec(
    model_type="internvl",
    **LLAVA_STYLE,
    tiny=TinyRecipe(
        config={
            "text_config": text("qwen2"),
            "vision_config": {**VIT, "image_size": [32, 32], "patch_size": [8, 8]},
            "image_token_id": IMAGE_ID,
            "downsample_ratio": 0.5,
        },
        specials={
            "context_image_token": ("<IMG_CONTEXT>", IMAGE_ID),
            "video_token": ("<video>", VIDEO_ID),
            "start_image_token": ("<img>", IMG_START_ID),
            "end_image_token": ("</img>", IMG_END_ID),
        },
        prompt_image="<IMG_CONTEXT>",
        image_tokens="shuffled",
        image_block="wrapped",
        pixels="flat",
        processor="internvl",
        processor_classes=("InternVLProcessor", "GotOcr2ImageProcessorPil"),
    ),
)
