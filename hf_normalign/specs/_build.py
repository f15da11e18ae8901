"""The processors `build_vlm` gives the LLaVA families it assembles from parts (their specs' `BuildRecipe`)."""

from __future__ import annotations

import functools
from typing import Any

import transformers

from hf_normalign.spec import BuildRecipe, ProcessorParts


def encoder_image_processor(vision_config: Any, norm: dict[str, list[float]], pinpoints: list[list[int]]) -> Any:
    """LLaVA-1.5: the vision encoder's own preprocessing (CLIP: resize and centre crop; SigLIP: resize)."""
    side = vision_config.image_size
    if vision_config.model_type == "siglip_vision_model":
        return transformers.SiglipImageProcessor(size={"height": side, "width": side}, **norm)
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, **norm
    )


def next_image_processor(vision_config: Any, norm: dict[str, list[float]], pinpoints: list[list[int]]) -> Any:
    side = vision_config.image_size
    return transformers.LlavaNextImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
        **norm,
    )


def onevision_image_processor(vision_config: Any, norm: dict[str, list[float]], pinpoints: list[list[int]]) -> Any:
    side = vision_config.image_size
    return transformers.LlavaOnevisionImageProcessor(
        size={"height": side, "width": side}, image_grid_pinpoints=pinpoints, **norm
    )


def llava_style_processor(class_name: str, parts: ProcessorParts) -> Any:
    """``LlavaProcessor`` / ``LlavaNextProcessor``: placeholders counted from the patch grid."""
    return getattr(transformers, class_name)(
        parts.image_processor,
        parts.tokenizer,
        patch_size=parts.vision_config.patch_size,
        vision_feature_select_strategy=parts.vision_feature_select_strategy,
        num_additional_image_tokens=parts.num_additional_image_tokens,
        image_token=parts.image_token,
        chat_template=parts.chat_template,
    )


def onevision_processor(parts: ProcessorParts) -> Any:
    try:
        video = transformers.LlavaOnevisionVideoProcessor()
    except ImportError as err:
        raise ImportError(
            f"family='llava_onevision' needs torchvision for its video processor ({err}). Install torchvision, or "
            "build family='llava_next' (the same anyres image path without video)."
        ) from err
    vision = parts.vision_config
    return transformers.LlavaOnevisionProcessor(
        parts.image_processor,
        parts.tokenizer,
        video,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy=parts.vision_feature_select_strategy,
        image_token=parts.image_token,
        video_token=parts.video_token,
        chat_template=parts.chat_template,
    )


LLAVA_BUILD = BuildRecipe(encoder_image_processor, functools.partial(llava_style_processor, "LlavaProcessor"))
LLAVA_NEXT_BUILD = BuildRecipe(
    next_image_processor, functools.partial(llava_style_processor, "LlavaNextProcessor"), anyres=True
)
LLAVA_ONEVISION_BUILD = BuildRecipe(onevision_image_processor, onevision_processor, anyres=True, video=True)
