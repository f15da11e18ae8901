"""Qwen2-VL."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._layouts import QWEN_STYLE
from ._tiny import MROPE, QWEN_IDS, QWEN_RECIPE, QWEN_VISION, text

SPEC = ArchitectureSpec(
    model_type="qwen2_vl",
    **QWEN_STYLE,
    tiny=TinyRecipe(
        config={
            "text_config": text("qwen2_vl_text", rope_scaling={"type": "mrope", **MROPE}),
            "vision_config": {
                **QWEN_VISION,
                "embed_dim": 64,
                "mlp_ratio": 2,
                "patch_size": 14,
            },
            **QWEN_IDS,
        },
        **QWEN_RECIPE,
        processor_classes=("Qwen2VLProcessor", "Qwen2VLImageProcessorPil"),
        width_key=("vision_config", "hidden_size"),
    ),
)
