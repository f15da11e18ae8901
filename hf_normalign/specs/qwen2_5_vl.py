"""Qwen2.5-VL."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._layouts import QWEN_STYLE
from ._tiny import MROPE, QWEN_IDS, QWEN_RECIPE, QWEN_VISION, text

SPEC = ArchitectureSpec(
    model_type="qwen2_5_vl",
    **QWEN_STYLE,
    tiny=TinyRecipe(
        config={
            "text_config": text("qwen2_5_vl_text", rope_scaling={"type": "mrope", **MROPE}),
            "vision_config": {
                **QWEN_VISION,
                "intermediate_size": 128,
                "out_hidden_size": 64,
                "fullatt_block_indexes": [1],
                "window_size": 112,
                "patch_size": 14,
            },
            **QWEN_IDS,
        },
        **QWEN_RECIPE,
        processor_classes=("Qwen2_5_VLProcessor", "Qwen2VLImageProcessorPil"),
        width_key=("vision_config", "out_hidden_size"),
    ),
)
