"""Qwen3-VL: besides the merger, the deepstack mergers' outputs are added to the vision positions
after the first decoder layers; `ProjectorNormConfig(deepstack=...)` decides whether they are
normalised too."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._layouts import QWEN_STYLE
from ._tiny import MROPE, QWEN_IDS, QWEN_RECIPE, QWEN_VISION, text

SPEC = ArchitectureSpec(
    model_type="qwen3_vl",
    extra_projectors=("model.visual.deepstack_merger_list",),
    **QWEN_STYLE,
    tiny=TinyRecipe(
        config={
            "text_config": text(
                "qwen3_vl_text", rope_scaling={"rope_type": "default", "mrope_interleaved": True, **MROPE}
            ),
            "vision_config": {
                **QWEN_VISION,
                "intermediate_size": 128,
                "out_hidden_size": 64,
                "deepstack_visual_indexes": [0, 1],
                "patch_size": 16,
                "num_position_embeddings": 16,
            },
            **QWEN_IDS,
        },
        **QWEN_RECIPE,
        processor_classes=("Qwen3VLProcessor", "Qwen2VLImageProcessorPil"),
        width_key=("vision_config", "out_hidden_size"),
    ),
)
