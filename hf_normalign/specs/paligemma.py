"""PaliGemma (Gemma LLM: embeddings scaled by sqrt(hidden_size) inside `embed_tokens`)."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._layouts import LLAVA_STYLE
from ._tiny import IMAGE_ID, IMAGE_RECIPE, VIT, text

SPEC = ArchitectureSpec(
    model_type="paligemma",
    **LLAVA_STYLE,
    placeholder_outside_vocab=True,  # the model maps an out-of-vocabulary image id to 0 before embedding
    tiny=TinyRecipe(
        config={
            "text_config": text("gemma"),
            "vision_config": {"model_type": "siglip_vision_model", **VIT},
            "image_token_id": IMAGE_ID,
            "projection_dim": 64,
        },
        **IMAGE_RECIPE,
        image_tokens="vit",
        pixels="flat",
        processor="paligemma",
        processor_classes=("PaliGemmaProcessor", "SiglipImageProcessorPil"),
        token_type="prefix",
        width_key=("", "projection_dim"),
    ),
)
