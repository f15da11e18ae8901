"""LLaVA / LLaVA-1.5 (`LlavaForConditionalGeneration`)."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._build import LLAVA_BUILD
from ._layouts import LLAVA_STYLE
from ._tiny import IMAGE_RECIPE, LLAVA_CONFIG

SPEC = ArchitectureSpec(
    model_type="llava",
    **LLAVA_STYLE,
    build=LLAVA_BUILD,
    tiny=TinyRecipe(
        config=LLAVA_CONFIG,
        **IMAGE_RECIPE,
        image_tokens="vit",
        pixels="flat",
        processor="llava",
        vision_cls=True,
        processor_classes=("LlavaProcessor", "CLIPImageProcessorPil"),
    ),
)
