"""LLaVA-NeXT: the `image_newline` tokens after the projector output count as vision positions."""

from hf_normalign.spec import ArchitectureSpec, TinyRecipe

from ._build import LLAVA_NEXT_BUILD
from ._layouts import LLAVA_STYLE
from ._tiny import IMAGE_RECIPE, LLAVA_CONFIG, PINPOINTS

SPEC = ArchitectureSpec(
    model_type="llava_next",
    **LLAVA_STYLE,
    vision_grid="overview_tile",
    build=LLAVA_NEXT_BUILD,
    tiny=TinyRecipe(
        config={**LLAVA_CONFIG, "image_grid_pinpoints": PINPOINTS},
        **IMAGE_RECIPE,
        image_tokens="anyres",
        pixels="anyres",
        processor="llava",
        vision_cls=True,
        processor_classes=("LlavaNextProcessor", "LlavaNextImageProcessorPil"),
    ),
)
