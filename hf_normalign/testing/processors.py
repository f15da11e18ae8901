"""Tiny processors: the real transformers classes (named by each recipe), with image processors sized for the
tiny tile. PIL image processors are used because the torchvision-backed ones do not import here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .family import Family, recipe
from .models import tiny_config
from .tokenizer import tiny_tokenizer

if TYPE_CHECKING:
    from transformers import ProcessorMixin


def _without_video(cls: type, *args: Any, **kwargs: Any) -> ProcessorMixin:
    """``cls(*args, video_processor=None, **kwargs)`` with the class check of the video slot skipped.

    ProcessorMixin checks each slot against ``VideoProcessorMixin``, which only exists when torchvision
    imports; a ``None`` video processor works as long as no videos are passed.
    """
    proc = cls.__new__(cls)
    check = proc.check_argument_for_proper_class
    proc.check_argument_for_proper_class = lambda name, arg: (
        None if name == "video_processor" and arg is None else check(name, arg)
    )
    try:
        cls.__init__(proc, *args, video_processor=None, **kwargs)
    finally:
        del proc.check_argument_for_proper_class
    # save_pretrained walks the attribute slots and reads each one's `_auto_class`: list the filled ones only.
    proc.get_attributes = lambda: [name for name in cls.get_attributes() if getattr(proc, name, None) is not None]
    return proc


def _classes(f: Family) -> list[type]:
    """The recipe's (processor, image processor) classes."""
    import transformers

    return [getattr(transformers, name) for name in f.recipe.processor_classes]


def _make(cls: type, *args: Any, **kwargs: Any) -> ProcessorMixin:
    """``cls(*args, **kwargs)``; without the video processor where ``cls`` has that slot (see `_without_video`)."""
    if "video_processor" in cls.get_attributes():
        return _without_video(cls, *args, **kwargs)
    return cls(*args, **kwargs)


def _proc_llava(f: Family, tok: Any) -> ProcessorMixin:
    cls, ip_cls = _classes(f)
    s = f.tile
    extra = {"image_grid_pinpoints": f.config.image_grid_pinpoints} if "image_grid_pinpoints" in f.recipe.config else {}
    ip = ip_cls(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, **extra)
    # num_additional_image_tokens=1 is CLIP's CLS, which the "default" feature strategy drops again.
    return cls(
        ip,
        tok,
        patch_size=f.config.vision_config.patch_size,
        num_additional_image_tokens=1,
        vision_feature_select_strategy=f.config.vision_feature_select_strategy,
    )


def _proc_onevision(f: Family, tok: Any) -> ProcessorMixin:
    cls, ip_cls = _classes(f)
    ip = ip_cls(size={"height": f.tile, "width": f.tile}, image_grid_pinpoints=f.config.image_grid_pinpoints)
    return _make(
        cls,
        ip,
        tok,
        num_image_tokens=f.vit_side**2,
        vision_feature_select_strategy=f.config.vision_feature_select_strategy,
    )


def _proc_qwen(f: Family, tok: Any) -> ProcessorMixin:
    cls, ip_cls = _classes(f)
    v = f.config.vision_config
    pixels = f.tile**2  # min = max pixels: every image is resized to the tiny 4x4 patch grid
    ip = ip_cls(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=v.patch_size,
        merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size,
    )
    return _make(cls, ip, tok)


def _proc_internvl(f: Family, tok: Any) -> ProcessorMixin:
    cls, ip_cls = _classes(f)
    ip = ip_cls(size={"height": f.tile, "width": f.tile}, max_patches=1)
    return _make(cls, ip, tok, image_seq_length=f.image_tokens(1))


def _proc_gemma3(f: Family, tok: Any) -> ProcessorMixin:
    cls, ip_cls = _classes(f)
    return cls(ip_cls(size={"height": f.tile, "width": f.tile}), tok, image_seq_length=f.config.mm_tokens_per_image)


def _proc_idefics(f: Family, tok: Any) -> ProcessorMixin:
    cls, ip_cls = _classes(f)
    # No image splitting: one global tile per image, the layout tiny_batch uses.
    size = {"longest_edge": f.tile}
    ip = ip_cls(size=size, max_image_size=size, do_image_splitting=False)
    return _make(cls, ip, tok, image_seq_len=f.image_tokens(1))


def _proc_paligemma(f: Family, tok: Any) -> ProcessorMixin:
    cls, ip_cls = _classes(f)
    ip = ip_cls(size={"height": f.tile, "width": f.tile})
    ip.image_seq_length = f.image_tokens(1)  # PaliGemmaProcessor reads the placeholder count from here
    return cls(ip, tok)


def _proc_pixtral(f: Family, tok: Any) -> ProcessorMixin:
    cls, ip_cls = _classes(f)
    patch, merge = f.config.vision_config.patch_size, f.config.spatial_merge_size
    # Image sides snap to multiples of patch * merge, so the merged patch grid is whole (as in Mistral3).
    ip = ip_cls(size={"longest_edge": f.tile}, patch_size={"height": patch * merge, "width": patch * merge})
    return cls(ip, tok, patch_size=patch, spatial_merge_size=merge)


_BUILDERS = {
    "llava": _proc_llava,
    "onevision": _proc_onevision,
    "qwen": _proc_qwen,
    "internvl": _proc_internvl,
    "gemma3": _proc_gemma3,
    "idefics": _proc_idefics,
    "paligemma": _proc_paligemma,
    "pixtral": _proc_pixtral,
}


def tiny_processor(family: str) -> ProcessorMixin:
    """The family's real transformers processor built on ``tiny_tokenizer`` and a tiny-tile image processor.

    Images of any size are resized to the tiny tile, so the output feeds ``tiny_model(family)`` directly::

        proc = tiny_processor("llava")
        inputs = proc(images=[pil_image], text=[f"describe {proc.image_token} briefly"], return_tensors="pt")
        tiny_model("llava")(**inputs)

    The processor carries the tokenizer's chat template and ``save_pretrained`` works for every family.
    Images only: video processors need torchvision and are left out. Raises ``NotImplementedError`` where
    the processor cannot be built: ``mistral3`` without torchvision (PixtralProcessor requires it) and
    ``smolvlm`` without the optional ``num2words`` package.
    """
    tokenizer = tiny_tokenizer(family)
    tiny = recipe(family)
    try:
        processor = _BUILDERS[tiny.processor](Family(tiny, tiny_config(family)), tokenizer)
    except ImportError as err:  # PixtralProcessor needs torchvision, SmolVLMProcessor the optional num2words
        raise NotImplementedError(
            f"tiny_processor({family!r}) cannot be built here: {err}; tiny_batch({family!r}) needs no processor"
        ) from err
    # The processor's own template, as on the Hub: apply_chat_template and TRL's collators read it there.
    processor.chat_template = tokenizer.chat_template
    return processor
