"""Gemma 3: the LLM scales its embeddings by sqrt(hidden_size) inside `embed_tokens`."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._layouts import LLAVA_STYLE
from ._tiny import IMAGE_ID, IMG_END_ID, IMG_START_ID, VIT, text

SPEC = ArchitectureSpec(
    model_type="gemma3",
    **LLAVA_STYLE,
    placeholder_outside_vocab=True,  # the model maps an out-of-vocabulary image id to 0 before embedding
    tiny=TinyRecipe(
        config={
            "text_config": text("gemma3_text"),
            "vision_config": {"model_type": "siglip_vision_model", **VIT},
            "mm_tokens_per_image": 4,
            "image_token_id": IMAGE_ID,
            "boi_token_index": IMG_START_ID,
            "eoi_token_index": IMG_END_ID,
        },
        specials={
            "image_token": ("<image_soft_token>", IMAGE_ID),
            "boi_token": ("<start_of_image>", IMG_START_ID),
            "eoi_token": ("<end_of_image>", IMG_END_ID),
        },
        prompt_image="<start_of_image>",
        image_tokens="fixed",
        image_block="wrapped",
        pixels="flat",
        processor="gemma3",
        processor_classes=("Gemma3Processor", "Gemma3ImageProcessorPil"),
        token_type="image",
    ),
)
