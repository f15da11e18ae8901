"""SmolVLM."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._layouts import IDEFICS_STYLE
from ._tiny import IDEFICS_CONFIG, IDEFICS_RECIPE

SPEC = ArchitectureSpec(
    model_type="smolvlm",
    **IDEFICS_STYLE,
    tiny=TinyRecipe(
        config=IDEFICS_CONFIG,
        **IDEFICS_RECIPE,
        processor_classes=("SmolVLMProcessor", "SmolVLMImageProcessorPil"),
    ),
)
