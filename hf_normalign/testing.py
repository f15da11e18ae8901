"""Offline factories for tiny vision-language models, tokenizers, processors and batches.

Everything here builds without network access (no HF Hub), so tests can exercise every supported VLM family
on CPU in milliseconds::

    from hf_normalign.testing import TINY_FAMILIES, tiny_batch, tiny_model

    for family in TINY_FAMILIES:
        model = tiny_model(family)
        out = model(**tiny_batch(model, ragged=True, padding_side="left"))
        assert out.loss.isfinite()

Token ids are shared by all families (text vocab = 256)::

    0 pad, 1 bos, 2 eos, 3 unk        4..199 text (trained BPE pieces, then <unused_k> fillers)
    200..235 Idefics3 / SmolVLM <row_i_col_j> tile tags
    250 image placeholder   251 video placeholder   252 image-block start   253 image-block end
    254 image separator (<global-img>, [IMG_BREAK])   255 <end_of_utterance>

``tiny_config`` and ``tiny_tokenizer`` agree on these ids, so processor output runs through ``tiny_model``.
Images are one vision tile: 32x32 pixels (56x56 for Qwen2/2.5-VL, 64x64 for Qwen3-VL).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

__all__ = [
    "TINY_FAMILIES",
    "tiny_batch",
    "tiny_config",
    "tiny_model",
    "tiny_processor",
    "tiny_text_batch",
    "tiny_tokenizer",
]

VOCAB_SIZE = 256
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
TEXT_ID_RANGE = (4, 200)  # random text ids come from here, so they never hit a special token
ROW_COL_FIRST_ID = 200
IMAGE_ID, VIDEO_ID, IMG_START_ID, IMG_END_ID, IMG_SEP_ID, EOU_ID = 250, 251, 252, 253, 254, 255
_QWEN_GRID = (1, 4, 4)  # (t, h, w) patches of one still image -> 4x4 / merge 2x2 = 4 LLM tokens

# ----------------------------------------------------------------------------------------------------------
# Config keyword sets (checked to build offline with transformers 5.17 and 5.24). Small enough that one image is a
# handful of tokens; special ids point at the layout above so no config id falls outside the vocab. Every Linear
# width is a multiple of 64, bitsandbytes' 4-bit block: on CPUs with AVX512-BF16 its eval-mode kernel repacks the
# weight per block and fails for narrower layers.
# ----------------------------------------------------------------------------------------------------------

_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}
_VIT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
_MROPE = {"mrope_section": [2, 3, 3]}  # sums to head_dim / 2
_PINPOINTS = [[32, 32], [32, 64], [64, 32]]
_QWEN_IDS = {
    "image_token_id": IMAGE_ID,
    "video_token_id": VIDEO_ID,
    "vision_start_token_id": IMG_START_ID,
    "vision_end_token_id": IMG_END_ID,
}


def _text(model_type: str, **extra: Any) -> dict[str, Any]:
    return {"model_type": model_type, **_TEXT, **extra}


_CONFIGS: dict[str, dict[str, Any]] = {
    "llava": {
        "text_config": _text("llama"),
        "vision_config": {"model_type": "clip_vision_model", **_VIT},
        "image_token_id": IMAGE_ID,
    },
    "llava_next": {
        "text_config": _text("llama"),
        "vision_config": {"model_type": "clip_vision_model", **_VIT},
        "image_token_id": IMAGE_ID,
        "image_grid_pinpoints": _PINPOINTS,
    },
    "llava_onevision": {
        "text_config": _text("qwen2"),
        "vision_config": {"model_type": "siglip_vision_model", **_VIT},
        "image_token_id": IMAGE_ID,
        "video_token_id": VIDEO_ID,
        "image_grid_pinpoints": _PINPOINTS,
    },
    "qwen2_vl": {
        "text_config": _text("qwen2_vl_text", rope_scaling={"type": "mrope", **_MROPE}),
        "vision_config": {
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_QWEN_IDS,
    },
    "qwen2_5_vl": {
        "text_config": _text("qwen2_5_vl_text", rope_scaling={"type": "mrope", **_MROPE}),
        "vision_config": {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "out_hidden_size": 64,
            "num_heads": 2,
            "fullatt_block_indexes": [1],
            "window_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_QWEN_IDS,
    },
    "qwen3_vl": {
        "text_config": _text(
            "qwen3_vl_text", rope_scaling={"rope_type": "default", "mrope_interleaved": True, **_MROPE}
        ),
        "vision_config": {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "out_hidden_size": 64,
            "num_heads": 2,
            "deepstack_visual_indexes": [0, 1],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 16,
        },
        **_QWEN_IDS,
    },
    "internvl": {
        "text_config": _text("qwen2"),
        "vision_config": {**_VIT, "image_size": [32, 32], "patch_size": [8, 8]},
        "image_token_id": IMAGE_ID,
        "downsample_ratio": 0.5,
    },
    "gemma3": {
        "text_config": _text("gemma3_text"),
        "vision_config": {"model_type": "siglip_vision_model", **_VIT},
        "mm_tokens_per_image": 4,
        "image_token_id": IMAGE_ID,
        "boi_token_index": IMG_START_ID,
        "eoi_token_index": IMG_END_ID,
    },
    "idefics3": {
        "text_config": _text("llama"),
        "vision_config": dict(_VIT),
        "scale_factor": 2,
        "image_token_id": IMAGE_ID,
        "pad_token_id": PAD_ID,  # the top-level default (128002) is outside the tiny vocab
    },
    "smolvlm": {
        "text_config": _text("llama"),
        "vision_config": dict(_VIT),
        "scale_factor": 2,
        "image_token_id": IMAGE_ID,
        "pad_token_id": PAD_ID,
    },
    "mistral3": {
        "text_config": _text("mistral"),
        "vision_config": {"model_type": "pixtral", **_VIT, "head_dim": 32},
        "image_token_id": IMAGE_ID,
        "spatial_merge_size": 2,
    },
    "paligemma": {
        "text_config": _text("gemma"),
        "vision_config": {"model_type": "siglip_vision_model", **_VIT},
        "image_token_id": IMAGE_ID,
        "projection_dim": 64,
    },
}

# ----------------------------------------------------------------------------------------------------------
# Per-family pieces: placeholders per image, token layout of an image block, pixel inputs.
# Counting is analytic for tile-sized images; the tests check every family by running a forward.
# ----------------------------------------------------------------------------------------------------------


def _first(x: Any) -> int:
    return x[0] if isinstance(x, (list, tuple)) else x


def _tile(cfg: PretrainedConfig) -> int:
    """Pixel side of one vision tile."""
    if cfg.model_type.startswith("qwen"):
        return _QWEN_GRID[1] * cfg.vision_config.patch_size
    return _first(cfg.vision_config.image_size)


def _vit_side(cfg: PretrainedConfig) -> int:
    return _tile(cfg) // _first(cfg.vision_config.patch_size)


def _n_vit(cfg: PretrainedConfig, n_images: int) -> int:
    # One token per patch; CLIP's CLS survives only the "full" feature strategy (SigLIP has none).
    cls = cfg.vision_config.model_type == "clip_vision_model" and cfg.vision_feature_select_strategy == "full"
    return _vit_side(cfg) ** 2 + int(cls)


def _n_anyres(cfg: PretrainedConfig, n_images: int) -> int:
    # A tile-sized image picks the 1x1 pinpoint: overview tile + one high-res tile with a newline per row.
    # LLaVA-OneVision feeds only the overview tile (+1 newline) when a sample holds several images.
    if cfg.model_type == "llava_onevision" and n_images > 1:
        return _n_vit(cfg, n_images) + 1
    side = _vit_side(cfg)
    return _n_vit(cfg, n_images) + side * (side + 1)


def _n_qwen(cfg: PretrainedConfig, n_images: int) -> int:
    return math.prod(_QWEN_GRID) // cfg.vision_config.spatial_merge_size**2


def _n_internvl(cfg: PretrainedConfig, n_images: int) -> int:
    return int(_vit_side(cfg) ** 2 * cfg.downsample_ratio**2)  # pixel shuffle shrinks the patch grid


def _n_gemma3(cfg: PretrainedConfig, n_images: int) -> int:
    return cfg.mm_tokens_per_image  # average-pooled to a fixed count


def _n_idefics(cfg: PretrainedConfig, n_images: int) -> int:
    return _vit_side(cfg) ** 2 // cfg.scale_factor**2


def _n_pixtral(cfg: PretrainedConfig, n_images: int) -> int:
    return (_vit_side(cfg) // cfg.spatial_merge_size) ** 2


def _block_plain(n: int) -> list[int]:
    return [IMAGE_ID] * n


def _block_wrapped(n: int) -> list[int]:
    # Qwen <|vision_start|>..<|vision_end|>, InternVL <img>..</img>, Gemma3 <start_of_image>..<end_of_image>.
    return [IMG_START_ID, *[IMAGE_ID] * n, IMG_END_ID]


def _block_idefics(n: int) -> list[int]:
    # Idefics3Processor without image splitting: <fake_token_around_image><global-img><image>*n<fake...>.
    return [IMG_START_ID, IMG_SEP_ID, *[IMAGE_ID] * n, IMG_START_ID]


def _block_pixtral(n: int) -> list[int]:
    # Pixtral: [IMG_BREAK] after each row of merged patches, the last one replaced by [IMG_END].
    side = math.isqrt(n)
    ids = ([IMAGE_ID] * side + [IMG_SEP_ID]) * side
    ids[-1] = IMG_END_ID
    return ids


def _pix_flat(cfg: PretrainedConfig, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = _tile(cfg)
    return {"pixel_values": torch.randn(b * n, 3, s, s, generator=gen)}


def _pix_sized(cfg: PretrainedConfig, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = _tile(cfg)
    return {**_pix_flat(cfg, b, n, gen), "image_sizes": torch.tensor([[s, s]] * (b * n))}


def _pix_anyres(cfg: PretrainedConfig, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # (images, tiles, C, H, W): tile 0 is the overview, tile 1 the 1x1 high-res grid.
    s = _tile(cfg)
    out = {
        "pixel_values": torch.randn(b * n, 2, 3, s, s, generator=gen),
        "image_sizes": torch.tensor([[s, s]] * (b * n)),
    }
    if cfg.model_type == "llava_onevision":
        out["batch_num_images"] = torch.tensor([n] * b)
    return out


def _pix_qwen(cfg: PretrainedConfig, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # Flattened patches: (sum of t*h*w, C * temporal_patch * patch^2) plus each image's (t, h, w) grid.
    v = cfg.vision_config
    dim = 3 * v.temporal_patch_size * v.patch_size**2
    return {
        "pixel_values": torch.randn(b * n * math.prod(_QWEN_GRID), dim, generator=gen),
        "image_grid_thw": torch.tensor([_QWEN_GRID] * (b * n)),
    }


def _pix_idefics(cfg: PretrainedConfig, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = _tile(cfg)
    return {
        "pixel_values": torch.randn(b, n, 3, s, s, generator=gen),
        "pixel_attention_mask": torch.ones(b, n, s, s, dtype=torch.bool),
    }


# ----------------------------------------------------------------------------------------------------------
# Processors: the real transformers classes, with image processors sized for the tiny tile.
# PIL image processors are used because the torchvision-backed ones do not import here.
# ----------------------------------------------------------------------------------------------------------


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


def _proc_llava(cfg: PretrainedConfig, tok: Any) -> ProcessorMixin:
    import transformers as tf

    s = _tile(cfg)
    cls, ip_cls = {
        "llava": (tf.LlavaProcessor, tf.CLIPImageProcessorPil),
        "llava_next": (tf.LlavaNextProcessor, tf.LlavaNextImageProcessorPil),
    }[cfg.model_type]
    extra = {"image_grid_pinpoints": cfg.image_grid_pinpoints} if cfg.model_type == "llava_next" else {}
    ip = ip_cls(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, **extra)
    # num_additional_image_tokens=1 is CLIP's CLS, which the "default" feature strategy drops again.
    return cls(
        ip,
        tok,
        patch_size=cfg.vision_config.patch_size,
        num_additional_image_tokens=1,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )


def _proc_onevision(cfg: PretrainedConfig, tok: Any) -> ProcessorMixin:
    import transformers as tf

    s = _tile(cfg)
    ip = tf.LlavaOnevisionImageProcessorPil(
        size={"height": s, "width": s}, image_grid_pinpoints=cfg.image_grid_pinpoints
    )
    return _without_video(
        tf.LlavaOnevisionProcessor,
        ip,
        tok,
        num_image_tokens=_vit_side(cfg) ** 2,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )


def _proc_qwen(cfg: PretrainedConfig, tok: Any) -> ProcessorMixin:
    import transformers as tf

    v = cfg.vision_config
    pixels = _tile(cfg) ** 2  # min = max pixels: every image is resized to the tiny 4x4 patch grid
    ip = tf.Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=v.patch_size,
        merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size,
    )
    cls = {
        "qwen2_vl": tf.Qwen2VLProcessor,
        "qwen2_5_vl": tf.Qwen2_5_VLProcessor,
        "qwen3_vl": tf.Qwen3VLProcessor,
    }[cfg.model_type]
    return _without_video(cls, ip, tok)


def _proc_internvl(cfg: PretrainedConfig, tok: Any) -> ProcessorMixin:
    import transformers as tf

    s = _tile(cfg)
    ip = tf.GotOcr2ImageProcessorPil(size={"height": s, "width": s}, max_patches=1)
    return _without_video(tf.InternVLProcessor, ip, tok, image_seq_length=_n_internvl(cfg, 1))


def _proc_gemma3(cfg: PretrainedConfig, tok: Any) -> ProcessorMixin:
    import transformers as tf

    s = _tile(cfg)
    ip = tf.Gemma3ImageProcessorPil(size={"height": s, "width": s})
    return tf.Gemma3Processor(ip, tok, image_seq_length=cfg.mm_tokens_per_image)


def _proc_idefics3(cfg: PretrainedConfig, tok: Any) -> ProcessorMixin:
    import transformers as tf

    s = _tile(cfg)
    # No image splitting: one global tile per image, the layout tiny_batch uses.
    kwargs = {"size": {"longest_edge": s}, "max_image_size": {"longest_edge": s}, "do_image_splitting": False}
    if cfg.model_type == "idefics3":
        try:
            image_processor = tf.Idefics3ImageProcessorPil(**kwargs)
        except ImportError as err:  # transformers < 5.2x: the PIL class is declared as needing torchvision
            raise NotImplementedError(f"tiny_processor('idefics3') cannot be built here: {err}") from err
        return tf.Idefics3Processor(image_processor, tok, image_seq_len=_n_idefics(cfg, 1))
    try:
        return _without_video(
            tf.SmolVLMProcessor, tf.SmolVLMImageProcessorPil(**kwargs), tok, image_seq_len=_n_idefics(cfg, 1)
        )
    except ImportError as err:  # SmolVLMProcessor insists on the optional `num2words` package
        raise NotImplementedError(f"tiny_processor('smolvlm') cannot be built here: {err}") from err


def _proc_paligemma(cfg: PretrainedConfig, tok: Any) -> ProcessorMixin:
    import transformers as tf

    s = _tile(cfg)
    ip = tf.SiglipImageProcessorPil(size={"height": s, "width": s})
    ip.image_seq_length = _n_vit(cfg, 1)  # PaliGemmaProcessor reads the placeholder count from here
    return tf.PaliGemmaProcessor(ip, tok)


def _proc_pixtral(cfg: PretrainedConfig, tok: Any) -> ProcessorMixin:
    import transformers as tf

    s, patch, merge = _tile(cfg), cfg.vision_config.patch_size, cfg.spatial_merge_size
    try:
        # Image sides snap to multiples of patch * merge, so the merged patch grid is whole (as in Mistral3).
        ip = tf.PixtralImageProcessorPil(
            size={"longest_edge": s}, patch_size={"height": patch * merge, "width": patch * merge}
        )
        return tf.PixtralProcessor(ip, tok, patch_size=patch, spatial_merge_size=merge)
    except ImportError as err:  # PixtralProcessor is declared @requires(backends=("torchvision", "torch"))
        raise NotImplementedError(
            f"tiny_processor('mistral3') cannot be built here (needs torchvision): {err}; "
            "use tiny_batch('mistral3') instead"
        ) from err


# ----------------------------------------------------------------------------------------------------------
# The family table
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    """How a family lays out images, which named special tokens it uses and how to build its processor."""

    n_image_tokens: Callable[[PretrainedConfig, int], int]  # (config, images per sample) -> placeholders
    image_block: Callable[[int], list[int]]  # placeholders -> ids of one image block
    pixels: Callable[[PretrainedConfig, int, int, torch.Generator], dict[str, torch.Tensor]]
    specials: dict[str, tuple[str, int]]  # tokenizer attribute -> (token, id); processors read these
    prompt_image: str  # what a prompt contains for one image (the processor expands it)
    processor: Callable[[PretrainedConfig, Any], ProcessorMixin]
    token_type: str = ""  # "mm": Qwen mm_token_type_ids; "image": Gemma3 / "prefix": PaliGemma token_type_ids
    extra_tokens: tuple[tuple[str, int], ...] = ()  # unnamed special tokens at fixed ids


_IMAGE = {"image_token": ("<image>", IMAGE_ID)}
_QWEN = {
    "specials": {
        "image_token": ("<|image_pad|>", IMAGE_ID),
        "video_token": ("<|video_pad|>", VIDEO_ID),
        "vision_start_token": ("<|vision_start|>", IMG_START_ID),
        "vision_end_token": ("<|vision_end|>", IMG_END_ID),
    },
    "prompt_image": "<|vision_start|><|image_pad|><|vision_end|>",
    "n_image_tokens": _n_qwen,
    "image_block": _block_wrapped,
    "pixels": _pix_qwen,
    "processor": _proc_qwen,
    "token_type": "mm",
}
_IDEFICS = {
    "specials": {
        "image_token": ("<image>", IMAGE_ID),
        "video_token": ("<video>", VIDEO_ID),
        "fake_image_token": ("<fake_token_around_image>", IMG_START_ID),
        "global_image_token": ("<global-img>", IMG_SEP_ID),
        "end_of_utterance_token": ("<end_of_utterance>", EOU_ID),
    },
    "prompt_image": "<image>",
    "n_image_tokens": _n_idefics,
    "image_block": _block_idefics,
    "pixels": _pix_idefics,
    "processor": _proc_idefics3,
    "extra_tokens": tuple(
        (f"<row_{i + 1}_col_{j + 1}>", ROW_COL_FIRST_ID + 6 * i + j) for i in range(6) for j in range(6)
    ),
}

_FAMILIES: dict[str, _Family] = {
    "llava": _Family(_n_vit, _block_plain, _pix_flat, _IMAGE, "<image>", _proc_llava),
    "llava_next": _Family(_n_anyres, _block_plain, _pix_anyres, _IMAGE, "<image>", _proc_llava),
    "llava_onevision": _Family(
        _n_anyres,
        _block_plain,
        _pix_anyres,
        {**_IMAGE, "video_token": ("<video>", VIDEO_ID)},
        "<image>",
        _proc_onevision,
    ),
    "qwen2_vl": _Family(**_QWEN),
    "qwen2_5_vl": _Family(**_QWEN),
    "qwen3_vl": _Family(**_QWEN),
    "internvl": _Family(
        _n_internvl,
        _block_wrapped,
        _pix_flat,
        {
            "context_image_token": ("<IMG_CONTEXT>", IMAGE_ID),
            "video_token": ("<video>", VIDEO_ID),
            "start_image_token": ("<img>", IMG_START_ID),
            "end_image_token": ("</img>", IMG_END_ID),
        },
        "<IMG_CONTEXT>",
        _proc_internvl,
    ),
    "gemma3": _Family(
        _n_gemma3,
        _block_wrapped,
        _pix_flat,
        {
            "image_token": ("<image_soft_token>", IMAGE_ID),
            "boi_token": ("<start_of_image>", IMG_START_ID),
            "eoi_token": ("<end_of_image>", IMG_END_ID),
        },
        "<start_of_image>",
        _proc_gemma3,
        token_type="image",
    ),
    "idefics3": _Family(**_IDEFICS),
    "smolvlm": _Family(**_IDEFICS),
    "mistral3": _Family(
        _n_pixtral,
        _block_pixtral,
        _pix_sized,
        {
            "image_token": ("[IMG]", IMAGE_ID),
            "image_break_token": ("[IMG_BREAK]", IMG_SEP_ID),
            "image_end_token": ("[IMG_END]", IMG_END_ID),
        },
        "[IMG]",
        _proc_pixtral,
    ),
    "paligemma": _Family(_n_vit, _block_plain, _pix_flat, _IMAGE, "<image>", _proc_paligemma, token_type="prefix"),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _family(family: str) -> _Family:
    if family not in _FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {TINY_FAMILIES}")
    return _FAMILIES[family]


# ----------------------------------------------------------------------------------------------------------
# Configs and models
# ----------------------------------------------------------------------------------------------------------


_WIDTH_KEYS = {
    "qwen2_vl": ("vision_config", "hidden_size"),
    "qwen2_5_vl": ("vision_config", "out_hidden_size"),
    "qwen3_vl": ("vision_config", "out_hidden_size"),
    "paligemma": ("", "projection_dim"),
}


def tiny_config(family: str, **text_overrides: Any) -> PretrainedConfig:
    """Config of a tiny ``family`` model: vocab 256, hidden 64, 2 decoder layers, one-tile images.

    ``text_overrides`` update ``text_config``; when ``hidden_size`` changes, ``head_dim`` follows it::

        cfg = tiny_config("llava", num_hidden_layers=4, hidden_size=128)
    """
    from transformers import AutoConfig

    _family(family)
    kwargs = copy.deepcopy(_CONFIGS[family])
    text = kwargs["text_config"]
    if "hidden_size" in text_overrides and "head_dim" not in text_overrides:
        heads = text_overrides.get("num_attention_heads", text["num_attention_heads"])
        text_overrides = {**text_overrides, "head_dim": text_overrides["hidden_size"] // heads}
    text.update(text_overrides)
    # Where the vision side emits the LLM width directly, it has to follow a new text hidden size.
    if family in _WIDTH_KEYS:
        section, key = _WIDTH_KEYS[family]
        (kwargs[section] if section else kwargs)[key] = text["hidden_size"]
    if family.startswith("qwen") and "rope_scaling" not in text_overrides:
        # M-RoPE (t, h, w) sections must split head_dim / 2; keep Qwen's 1/4, 3/8, 3/8 proportions.
        half = text["head_dim"] // 2
        t = half // 4
        text["rope_scaling"]["mrope_section"] = [t, (half - t) // 2, half - t - (half - t) // 2]
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(
    family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **text_overrides: Any
) -> PreTrainedModel:
    """A randomly initialised tiny ``...ForConditionalGeneration`` model in eval mode.

    Weights are the transformers default init and depend only on ``seed``; the global RNG is left untouched::

        model = tiny_model("qwen2_vl", num_hidden_layers=3)
        logits = model(**tiny_batch(model)).logits
    """
    from transformers import AutoModelForImageTextToText

    cfg = tiny_config(family, **text_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg)
    # transformers zero-initialises a few weight matrices (Gemma3's mm_input_projection_weight, InternViT's
    # cls/position embeddings); a zero projector would make every image feature exactly 0, so draw them too.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        std = getattr(cfg, "initializer_range", None) or cfg.get_text_config().initializer_range
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, std)
    model.to(dtype).eval()
    gen = model.generation_config  # ids in the tiny vocab, so generate() does not warn about padding
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    return model


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------

_CORPUS = """\
a photo of a cat sitting on a red bench in the park.
the dog runs across the green grass to catch the ball.
two people are walking along the beach at sunset.
describe the image in one sentence.
what color is the car parked next to the house?
there is a small boat on the lake and mountains behind it.
the chart shows the number of visitors per month.
how many apples are on the table? there are three apples.
a man is riding a bicycle down a busy street in the city.
the woman holds an umbrella because it is raining.
answer the question using a single word or phrase.
this picture was taken in the kitchen during the morning.
the text on the sign says stop, please read it aloud.
is there a person in the picture? yes, there is one.
user: what is shown here? assistant: a plate with food.
"""
# Every printable ASCII character (and newline) is a base token, so ordinary text never maps to <unk>.
_ALPHABET = [chr(c) for c in range(33, 127)] + ["\n", "\t", "▁"]
_CHAT_TEMPLATE = (  # "role: text" lines; image parts render as the family's prompt placeholder
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} IMAGE_PLACEHOLDER{% elif part['type'] == 'text' %} {{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
_BASE_SPECIALS = {
    "pad_token": ("<pad>", PAD_ID),
    "bos_token": ("<s>", BOS_ID),
    "eos_token": ("</s>", EOS_ID),
    "unk_token": ("<unk>", UNK_ID),
}
_BPE: dict[str, Any] = {}


def _trained_bpe() -> tuple[dict[str, int], list[Any]]:
    """BPE vocab (ids < 200) and merges trained once on ``_CORPUS``."""
    if not _BPE:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=TEXT_ID_RANGE[1],
            special_tokens=[t for t, _ in _BASE_SPECIALS.values()],
            initial_alphabet=_ALPHABET,
            show_progress=False,
        )
        tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
        model = json.loads(tok.to_str())["model"]
        _BPE.update(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    return _BPE["vocab"], _BPE["merges"]


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A 256-entry fast tokenizer for ``family``, trained in memory on a small English corpus.

    Text pieces use ids 4..199 and the family's special tokens sit at the ids of ``tiny_config(family)``.
    They are also named attributes (``tok.image_token``, ``tok.image_token_id``, ``tok.boi_token`` ...),
    which is what the transformers processors look up. A simple chat template is included::

        tok = tiny_tokenizer("llava")
        tok("a cat <image> on a bench").input_ids  # [1, ..., 250, ...]
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fam = _family(family)
    trained, merges = _trained_bpe()
    fixed = {tok: i for tok, i in [*_BASE_SPECIALS.values(), *fam.specials.values(), *fam.extra_tokens]}
    by_id = {i: tok for tok, i in fixed.items()}
    # Special tokens live inside the model vocab at their fixed ids, and <unused_k> fills the gaps, so the
    # tokenizer has exactly as many entries as the embedding table.
    vocab = dict(trained)
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[by_id.get(i, f"<unused_{i}>")] = i
    if any(vocab.get(tok) != i for tok, i in fixed.items()):
        raise RuntimeError("a special token collides with the trained BPE vocab")

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.add_special_tokens([AddedToken(tok, normalized=False, special=True) for tok in fixed])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{name: tok for name, (tok, _) in _BASE_SPECIALS.items()},
        extra_special_tokens={name: tok for name, (tok, _) in fam.specials.items()},
        chat_template=_CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", fam.prompt_image),
    )
    tokenizer.add_bos_token = True
    return tokenizer


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
    processor = _family(family).processor(tiny_config(family), tokenizer)
    # The processor's own template, as on the Hub: apply_chat_template and TRL's collators read it there.
    processor.chat_template = tokenizer.chat_template
    return processor


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------


def _resolve(model_or_family: PreTrainedModel | str) -> tuple[_Family, PretrainedConfig, torch.dtype]:
    if isinstance(model_or_family, str):
        return _family(model_or_family), tiny_config(model_or_family), torch.float32
    cfg = model_or_family.config
    return _family(cfg.model_type), cfg, model_or_family.dtype


def _text_lengths(batch_size: int, n_text: int, ragged: bool) -> list[int]:
    if not ragged:
        return [n_text] * batch_size
    # Sample 0 is the longest; the others shrink evenly down to about half of it.
    return [n_text - (i * (n_text // 2)) // max(1, batch_size - 1) for i in range(batch_size)]


def _pad(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor(
        [[value] * (width - len(r)) + r if side == "left" else r + [value] * (width - len(r)) for r in rows]
    )


# Token kinds used while assembling a batch.
_PAD, _TEXT_KIND, _IMAGE_KIND, _PREFIX_KIND = -1, 0, 1, 2


def _assemble(
    seqs: list[list[int]], kinds: list[list[int]], padding_side: str, with_labels: bool, token_type: str
) -> dict[str, torch.Tensor]:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    input_ids = _pad(seqs, PAD_ID, padding_side)
    kind = _pad(kinds, _PAD, padding_side)
    out = {"input_ids": input_ids, "attention_mask": (kind != _PAD).long()}
    if token_type == "mm":  # Qwen M-RoPE needs to know which tokens are image patches (0 text, 1 image)
        out["mm_token_type_ids"] = (kind == _IMAGE_KIND).long()
    elif token_type == "image":  # Gemma3 attends bidirectionally inside each image block
        out["token_type_ids"] = (kind == _IMAGE_KIND).long()
    elif token_type == "prefix":  # PaliGemma: 0 = bidirectional prefix (+ padding), 1 = causal suffix
        out["token_type_ids"] = (kind == _TEXT_KIND).long()
    if with_labels:
        labels = input_ids.clone()
        labels[kind != _TEXT_KIND] = -100  # no loss on padding, image placeholders or PaliGemma's prefix
        out["labels"] = labels
    return out


def tiny_batch(
    model_or_family: PreTrainedModel | str,
    *,
    batch_size: int = 2,
    seq_text: int = 8,
    images_per_sample: int = 1,
    padding_side: str = "right",
    ragged: bool = False,
    with_labels: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random model inputs with images for a tiny model (or family name), built without a processor.

    A sample is ``[bos, text, image block x images_per_sample, text]`` with ``seq_text`` text tokens (bos
    included; ids in 4..199). Each image block holds exactly as many placeholders as the model expects,
    wrapped in the family's marker tokens (``<|vision_start|>``, ``<img>``, ``<start_of_image>``, Idefics3's
    ``<fake_token_around_image><global-img>``, Pixtral's ``[IMG_BREAK]``/``[IMG_END]``). Extra inputs:

    - ``image_sizes``: llava_next, llava_onevision (+ ``batch_num_images``), mistral3
    - ``image_grid_thw`` and ``mm_token_type_ids``: qwen2_vl, qwen2_5_vl, qwen3_vl
    - ``pixel_attention_mask``: idefics3, smolvlm (``pixel_values`` is ``(batch, images, 3, H, W)`` there)
    - ``token_type_ids``: gemma3 (1 on image tokens), paligemma (0 on the prefix up to the image, 1 after)

    ``ragged=True`` shortens the text of samples 1.. and pads them on ``padding_side`` with id 0 and
    ``attention_mask`` 0. ``labels`` copy ``input_ids`` with -100 on padding and image placeholders, and on
    PaliGemma's bidirectional prefix, as its processor does. ``pixel_values`` take the model's dtype::

        model = tiny_model("llava_next")
        loss = model(**tiny_batch(model, ragged=True, padding_side="left")).loss
    """
    fam, cfg, dtype = _resolve(model_or_family)
    if seq_text < 2:
        raise ValueError("seq_text must be >= 2 (text before and after the images)")
    if images_per_sample < 1:
        raise ValueError("images_per_sample must be >= 1; use tiny_text_batch for text only")
    gen = torch.Generator().manual_seed(seed)
    block = fam.image_block(fam.n_image_tokens(cfg, images_per_sample)) * images_per_sample
    pre_kind = _PREFIX_KIND if fam.token_type == "prefix" else _TEXT_KIND
    block_kind = [_IMAGE_KIND if t == IMAGE_ID else pre_kind for t in block]

    seqs, kinds = [], []
    for n_text in _text_lengths(batch_size, seq_text, ragged):
        text = [BOS_ID, *torch.randint(*TEXT_ID_RANGE, (n_text - 1,), generator=gen).tolist()]
        n_pre = n_text // 2
        seqs.append(text[:n_pre] + block + text[n_pre:])
        kinds.append([pre_kind] * n_pre + block_kind + [_TEXT_KIND] * (n_text - n_pre))
    out = _assemble(seqs, kinds, padding_side, with_labels, fam.token_type)
    pixels = fam.pixels(cfg, batch_size, images_per_sample, gen)
    pixels["pixel_values"] = pixels["pixel_values"].to(dtype)
    return out | pixels


def tiny_text_batch(
    model_or_family: PreTrainedModel | str,
    *,
    batch_size: int = 2,
    seq_len: int = 8,
    padding_side: str = "right",
    ragged: bool = False,
    with_labels: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Text-only ``input_ids``, ``attention_mask`` (and ``labels``) for any tiny family, same rules as
    ``tiny_batch`` without images::

        out = tiny_model("gemma3")(**tiny_text_batch("gemma3", ragged=True, padding_side="left"))
    """
    _resolve(model_or_family)  # validates the family
    gen = torch.Generator().manual_seed(seed)
    seqs = [
        [BOS_ID, *torch.randint(*TEXT_ID_RANGE, (n - 1,), generator=gen).tolist()]
        for n in _text_lengths(batch_size, seq_len, ragged)
    ]
    kinds = [[_TEXT_KIND] * len(s) for s in seqs]
    return _assemble(seqs, kinds, padding_side, with_labels, token_type="")
