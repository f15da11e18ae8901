"""Offline factories for tiny vision-language models, tokenizers, processors and batches.

Everything here builds without network access (no HF Hub), so tests of ``hf_normalign`` can exercise every
supported VLM family on CPU in milliseconds::

    from hf_normalign.testing import TINY_FAMILIES, tiny_batch, tiny_model

    for family in TINY_FAMILIES:
        model = tiny_model(family)
        out = model(**tiny_batch(model, ragged=True, padding_side="left"))
        assert out.loss.isfinite()

Token id layout shared by all families (model vocab = 256)::

    0 pad, 1 bos, 2 eos, 3 unk          4..199 ordinary text (BPE pieces, then <unused_k> fillers)
    200..235 Idefics3 / SmolVLM <row_i_col_j> tile tags
    250 image placeholder, 251 video placeholder, 252 image-block start, 253 image-block end,
    254 image separator (<global-img> / [IMG_BREAK]), 255 <end_of_utterance>

The ids of a family's special tokens are the same in ``tiny_config`` and ``tiny_tokenizer``, so processor output
runs through the tiny model unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

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
TEXT_ID_RANGE = (4, 200)  # random text tokens are drawn here, so they never collide with special ids
ROW_COL_FIRST_ID = 200
IMAGE_ID, VIDEO_ID, IMG_START_ID, IMG_END_ID, IMG_SEP_ID, EOU_ID = 250, 251, 252, 253, 254, 255

_BASE_SPECIALS = {"pad_token": ("<pad>", PAD_ID), "bos_token": ("<s>", BOS_ID), "eos_token": ("</s>", EOS_ID),
                  "unk_token": ("<unk>", UNK_ID)}

# Small decoder / vision towers. Taken from a set that was checked to build offline with transformers 5.23;
# sizes are chosen so that one image is a handful of tokens (keeps sequences short and tests fast).
_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}
_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 32, "patch_size": 8}
_MROPE = {"mrope_section": [2, 3, 3]}
_PINPOINTS = [[32, 32], [32, 64], [64, 32]]


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
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "image_token_id": IMAGE_ID,
        "video_token_id": VIDEO_ID,
        "vision_start_token_id": IMG_START_ID,
        "vision_end_token_id": IMG_END_ID,
    },
    "qwen2_5_vl": {
        "text_config": _text("qwen2_5_vl_text", rope_scaling={"type": "mrope", **_MROPE}),
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32,
                          "num_heads": 2, "fullatt_block_indexes": [1], "window_size": 112, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2},
        "image_token_id": IMAGE_ID,
        "video_token_id": VIDEO_ID,
        "vision_start_token_id": IMG_START_ID,
        "vision_end_token_id": IMG_END_ID,
    },
    "qwen3_vl": {
        "text_config": _text("qwen3_vl_text",
                             rope_scaling={"rope_type": "default", "mrope_interleaved": True, **_MROPE}),
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32,
                          "num_heads": 2, "deepstack_visual_indexes": [0, 1], "patch_size": 16,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 16},
        "image_token_id": IMAGE_ID,
        "video_token_id": VIDEO_ID,
        "vision_start_token_id": IMG_START_ID,
        "vision_end_token_id": IMG_END_ID,
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
        "pad_token_id": PAD_ID,
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
        "vision_config": {"model_type": "pixtral", **_VIT, "head_dim": 16},
        "image_token_id": IMAGE_ID,
        "spatial_merge_size": 2,
    },
    "paligemma": {
        "text_config": _text("gemma"),
        "vision_config": {"model_type": "siglip_vision_model", **_VIT},
        "image_token_id": IMAGE_ID,
        "projection_dim": 32,
    },
}


# ----------------------------------------------------------------------------------------------------------
# Per-family table: special tokens, image size, how many placeholders one image needs and how pixels look.
# ----------------------------------------------------------------------------------------------------------


def _vit_side(cfg: Any) -> int:
    """Patches per side of a square ViT tile."""
    image_size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return image_size // patch


def _tile(cfg: Any) -> int:
    size = cfg.vision_config.image_size
    return size[0] if isinstance(size, (list, tuple)) else size


def _qwen_grid(cfg: Any) -> tuple[int, int, int]:
    # 4x4 patches per image -> (4 / merge)^2 = 4 LLM tokens; t=1 for a still image.
    return (1, 4, 4)


def _n_llava(cfg: Any, n_images: int) -> int:
    # CLIP adds a CLS token that the "default" strategy drops again.
    return _vit_side(cfg) ** 2 + (1 if cfg.vision_config.model_type == "clip_vision_model" and
                                  cfg.vision_feature_select_strategy == "full" else 0)


def _n_anyres(cfg: Any, n_images: int) -> int:
    # Square tile-sized images pick the 1x1 grid pinpoint: base tile + one high-res tile with a newline per row.
    # LLaVA-OneVision feeds only the base tile (+1 newline) when a sample has several images.
    side = _vit_side(cfg)
    base = _n_llava(cfg, n_images)
    if cfg.model_type == "llava_onevision" and n_images > 1:
        return base + 1
    return base + side * (side + 1)


def _n_qwen(cfg: Any, n_images: int) -> int:
    t, h, w = _qwen_grid(cfg)
    return t * h * w // cfg.vision_config.spatial_merge_size**2


def _n_internvl(cfg: Any, n_images: int) -> int:
    return int(_vit_side(cfg) ** 2 * cfg.downsample_ratio**2)


def _n_gemma3(cfg: Any, n_images: int) -> int:
    return cfg.mm_tokens_per_image


def _n_idefics(cfg: Any, n_images: int) -> int:
    return _vit_side(cfg) ** 2 // cfg.scale_factor**2


def _n_mistral3(cfg: Any, n_images: int) -> int:
    return (_vit_side(cfg) // cfg.spatial_merge_size) ** 2


def _n_paligemma(cfg: Any, n_images: int) -> int:
    return _vit_side(cfg) ** 2


def _block_plain(cfg: Any, n: int) -> list[int]:
    return [IMAGE_ID] * n


def _block_wrapped(cfg: Any, n: int) -> list[int]:
    return [IMG_START_ID, *[IMAGE_ID] * n, IMG_END_ID]


def _block_idefics(cfg: Any, n: int) -> list[int]:
    # Same layout as Idefics3Processor without image splitting: <fake><global-img><image>*n<fake>.
    return [IMG_START_ID, IMG_SEP_ID, *[IMAGE_ID] * n, IMG_START_ID]


def _block_pixtral(cfg: Any, n: int) -> list[int]:
    # Pixtral: one [IMG_BREAK] after every row of merged patches, the last one replaced by [IMG_END].
    side = math.isqrt(n)
    ids: list[int] = []
    for _ in range(side):
        ids += [IMAGE_ID] * side + [IMG_SEP_ID]
    ids[-1] = IMG_END_ID
    return ids


def _rand_pixels(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _pix_flat(cfg: Any, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = _tile(cfg)
    return {"pixel_values": _rand_pixels(gen, b * n, 3, s, s)}


def _pix_anyres(cfg: Any, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # (images, tiles, C, H, W): tile 0 is the downscaled overview, tile 1 the 1x1 high-res grid.
    s = _tile(cfg)
    out = {
        "pixel_values": _rand_pixels(gen, b * n, 2, 3, s, s),
        "image_sizes": torch.tensor([[s, s]] * (b * n)),
    }
    if cfg.model_type == "llava_onevision":
        out["batch_num_images"] = torch.tensor([n] * b)
    return out


def _pix_qwen(cfg: Any, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # Qwen-VL takes flattened patches: (sum of t*h*w, C * temporal_patch * patch * patch) plus their grid.
    v = cfg.vision_config
    t, h, w = _qwen_grid(cfg)
    dim = 3 * v.temporal_patch_size * v.patch_size**2
    return {
        "pixel_values": _rand_pixels(gen, b * n * t * h * w, dim),
        "image_grid_thw": torch.tensor([[t, h, w]] * (b * n)),
    }


def _pix_idefics(cfg: Any, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = _tile(cfg)
    return {
        "pixel_values": _rand_pixels(gen, b, n, 3, s, s),
        "pixel_attention_mask": torch.ones(b, n, s, s, dtype=torch.bool),
    }


def _pix_mistral3(cfg: Any, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = _tile(cfg)
    return {"pixel_values": _rand_pixels(gen, b * n, 3, s, s), "image_sizes": torch.tensor([[s, s]] * (b * n))}


@dataclass(frozen=True)
class _Family:
    """How one family lays out images, and which named special tokens its tokenizer/processor expects."""

    n_image_tokens: Callable[[Any, int], int]  # (config, images per sample) -> placeholders per image
    image_block: Callable[[Any, int], list[int]]  # (config, n placeholders) -> ids of one image block
    pixels: Callable[[Any, int, int, torch.Generator], dict[str, torch.Tensor]]
    specials: dict[str, tuple[str, int]]  # tokenizer attribute -> (token string, id)
    prompt_image: str  # what a user writes in the prompt for one image (what the processor expands)
    extra_tokens: tuple[tuple[str, int], ...] = ()  # unnamed special tokens at fixed ids
    token_type: str = ""  # "mm": Qwen mm_token_type_ids; "image": Gemma3 token_type_ids; "prefix": PaliGemma
    processor_error: str = ""  # why tiny_processor cannot be built here (empty: it can)
    notes: dict[str, Any] = field(default_factory=dict)


_LLAVA_SPECIALS = {"image_token": ("<image>", IMAGE_ID)}
_QWEN_SPECIALS = {
    "image_token": ("<|image_pad|>", IMAGE_ID),
    "video_token": ("<|video_pad|>", VIDEO_ID),
    "vision_start_token": ("<|vision_start|>", IMG_START_ID),
    "vision_end_token": ("<|vision_end|>", IMG_END_ID),
}
_IDEFICS_SPECIALS = {
    "image_token": ("<image>", IMAGE_ID),
    "video_token": ("<video>", VIDEO_ID),
    "fake_image_token": ("<fake_token_around_image>", IMG_START_ID),
    "global_image_token": ("<global-img>", IMG_SEP_ID),
    "end_of_utterance_token": ("<end_of_utterance>", EOU_ID),
}
_ROW_COL = tuple((f"<row_{i + 1}_col_{j + 1}>", ROW_COL_FIRST_ID + 6 * i + j) for i in range(6) for j in range(6))
_NO_TORCHVISION = "needs torchvision (not importable beside torch 2.13 here)"

_FAMILIES: dict[str, _Family] = {
    "llava": _Family(_n_llava, _block_plain, _pix_flat, _LLAVA_SPECIALS, "<image>"),
    "llava_next": _Family(_n_anyres, _block_plain, _pix_anyres, _LLAVA_SPECIALS, "<image>"),
    "llava_onevision": _Family(
        _n_anyres, _block_plain, _pix_anyres,
        {**_LLAVA_SPECIALS, "video_token": ("<video>", VIDEO_ID)}, "<image>",
    ),
    "qwen2_vl": _Family(_n_qwen, _block_wrapped, _pix_qwen, _QWEN_SPECIALS,
                        "<|vision_start|><|image_pad|><|vision_end|>", token_type="mm"),
    "qwen2_5_vl": _Family(_n_qwen, _block_wrapped, _pix_qwen, _QWEN_SPECIALS,
                          "<|vision_start|><|image_pad|><|vision_end|>", token_type="mm"),
    "qwen3_vl": _Family(_n_qwen, _block_wrapped, _pix_qwen, _QWEN_SPECIALS,
                        "<|vision_start|><|image_pad|><|vision_end|>", token_type="mm"),
    "internvl": _Family(
        _n_internvl, _block_wrapped, _pix_flat,
        {
            "context_image_token": ("<IMG_CONTEXT>", IMAGE_ID),
            "video_token": ("<video>", VIDEO_ID),
            "start_image_token": ("<img>", IMG_START_ID),
            "end_image_token": ("</img>", IMG_END_ID),
        },
        "<IMG_CONTEXT>",
    ),
    "gemma3": _Family(
        _n_gemma3, _block_wrapped, _pix_flat,
        {
            "image_token": ("<image_soft_token>", IMAGE_ID),
            "boi_token": ("<start_of_image>", IMG_START_ID),
            "eoi_token": ("<end_of_image>", IMG_END_ID),
        },
        "<start_of_image>", token_type="image",
    ),
    "idefics3": _Family(_n_idefics, _block_idefics, _pix_idefics, _IDEFICS_SPECIALS, "<image>",
                        extra_tokens=_ROW_COL),
    "smolvlm": _Family(_n_idefics, _block_idefics, _pix_idefics, _IDEFICS_SPECIALS, "<image>",
                       extra_tokens=_ROW_COL),
    "mistral3": _Family(
        _n_mistral3, _block_pixtral, _pix_mistral3,
        {"image_token": ("[IMG]", IMAGE_ID), "image_break_token": ("[IMG_BREAK]", IMG_SEP_ID),
         "image_end_token": ("[IMG_END]", IMG_END_ID)},
        "[IMG]", processor_error=f"PixtralProcessor {_NO_TORCHVISION}",
    ),
    "paligemma": _Family(_n_paligemma, _block_plain, _pix_flat, _LLAVA_SPECIALS, "<image>",
                         token_type="prefix"),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _family(family: str) -> _Family:
    if family not in _FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {TINY_FAMILIES}")
    return _FAMILIES[family]


# ----------------------------------------------------------------------------------------------------------
# Configs and models
# ----------------------------------------------------------------------------------------------------------


def tiny_config(family: str, **text_overrides: Any):
    """Config of a tiny ``family`` model (vocab 256, hidden 32, 2 layers, 32x32 images).

    ``text_overrides`` go to ``text_config``, e.g. ``tiny_config("llava", num_hidden_layers=4, hidden_size=64)``.
    When ``hidden_size`` changes, the head count is kept and ``head_dim`` follows unless given too.
    """
    from transformers import AutoConfig

    _family(family)
    kwargs = copy.deepcopy(_CONFIGS[family])
    text = kwargs["text_config"]
    if "hidden_size" in text_overrides and "head_dim" not in text_overrides:
        heads = text_overrides.get("num_attention_heads", text["num_attention_heads"])
        text_overrides["head_dim"] = text_overrides["hidden_size"] // heads
    text.update(text_overrides)
    cfg = AutoConfig.for_model(family, **kwargs)
    return cfg


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **text_overrides: Any):
    """A randomly initialised tiny ``...ForConditionalGeneration`` model in eval mode.

    Weights depend only on ``seed`` (the global RNG state is left untouched)::

        model = tiny_model("qwen2_vl", num_hidden_layers=3)
        model(**tiny_batch(model))
    """
    from transformers import AutoModelForImageTextToText

    cfg = tiny_config(family, **text_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg)
    model.to(dtype).eval()
    gen_cfg = model.generation_config
    gen_cfg.bos_token_id, gen_cfg.eos_token_id, gen_cfg.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    return model


# ----------------------------------------------------------------------------------------------------------
# Tokenizers and processors
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
0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ' " ( ) - the a an of to in is and on with
"""


def _train_bpe():
    """Train a byte-free BPE with Metaspace pre-tokenisation; returns (vocab, merges) below id 200."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_ID_RANGE[1],
        special_tokens=[tok for tok, _ in _BASE_SPECIALS.values()],
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.decoder = decoders.Metaspace()
    import json

    model = json.loads(tok.to_str())["model"]
    return model["vocab"], model["merges"]


_BPE_CACHE: list[Any] = []


def tiny_tokenizer(family: str):
    """A 256-entry fast tokenizer for ``family``, trained in memory on a tiny English corpus.

    Text pieces use ids 4..199; the family's special tokens sit at the ids of ``tiny_config(family)``
    (e.g. ``"<image>"`` -> 250) and are exposed as named attributes (``tok.image_token``, ``tok.image_token_id``,
    ...), which is what the transformers processors look up::

        tok = tiny_tokenizer("llava")
        tok("a cat <image> on a bench").input_ids  # [1, ..., 250, ...]
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fam = _family(family)
    if not _BPE_CACHE:
        _BPE_CACHE.append(_train_bpe())
    trained_vocab, merges = _BPE_CACHE[0]
    named = {**_BASE_SPECIALS, **fam.specials}
    fixed = {tok: i for tok, i in named.values()} | dict(fam.extra_tokens)
    by_id = {i: tok for tok, i in fixed.items()}
    # Fill every id up to 255 so the tokenizer and the embedding table have exactly the same size.
    vocab = dict(trained_vocab)
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[by_id.get(i, f"<unused_{i}>")] = i
    assert all(vocab[tok] == i for tok, i in fixed.items()), "special token collides with the trained vocab"

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.add_special_tokens([AddedToken(tok, normalized=False, special=True) for tok in sorted(fixed)])
    extra = {name: tok for name, (tok, _) in fam.specials.items()}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{name: tok for name, (tok, _) in _BASE_SPECIALS.items()},
        extra_special_tokens=extra,
        chat_template=_CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", fam.prompt_image),
    )
    tokenizer.add_bos_token = True
    return tokenizer


# Minimal chat template: "<role>: text" lines; image parts render as the family's prompt placeholder.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} IMAGE_PLACEHOLDER{% elif part['type'] == 'text' %} {{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_processor(family: str):
    """The family's real transformers processor on top of ``tiny_tokenizer`` and a tiny-image image processor.

    Images of any size are resized to the tiny config's resolution, so the output feeds ``tiny_model(family)``::

        proc = tiny_processor("llava")
        inputs = proc(images=pil_image, text=f"describe {proc.image_token} briefly", return_tensors="pt")
        tiny_model("llava")(**inputs)

    Raises ``NotImplementedError`` for families whose processor cannot be built offline here
    (see ``_Family.processor_error``).
    """
    fam = _family(family)
    if fam.processor_error:
        raise NotImplementedError(f"tiny_processor({family!r}): {fam.processor_error}")
    cfg = tiny_config(family)
    tok = tiny_tokenizer(family)
    s = _tile(cfg)
    import transformers as tf

    # Shared normalisation kwargs: real processors vary; the tiny models don't care.
    if family == "llava":
        ip = tf.CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        return tf.LlavaProcessor(ip, tok, patch_size=cfg.vision_config.patch_size,
                                 vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                 num_additional_image_tokens=1)
    if family == "llava_next":
        ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                           image_grid_pinpoints=cfg.image_grid_pinpoints)
        return tf.LlavaNextProcessor(ip, tok, patch_size=cfg.vision_config.patch_size,
                                     vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                     num_additional_image_tokens=1)
    if family == "llava_onevision":
        ip = tf.LlavaOnevisionImageProcessorPil(size={"height": s, "width": s},
                                                image_grid_pinpoints=cfg.image_grid_pinpoints)
        return tf.LlavaOnevisionProcessor(ip, tok, video_processor=None, num_image_tokens=_vit_side(cfg) ** 2,
                                          vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        v = cfg.vision_config
        px = (_qwen_grid(cfg)[1] * v.patch_size) ** 2
        ip = tf.Qwen2VLImageProcessorPil(size={"shortest_edge": px, "longest_edge": px}, patch_size=v.patch_size,
                                         merge_size=v.spatial_merge_size,
                                         temporal_patch_size=v.temporal_patch_size)
        cls = {"qwen2_vl": tf.Qwen2VLProcessor, "qwen2_5_vl": tf.Qwen2_5_VLProcessor,
               "qwen3_vl": tf.Qwen3VLProcessor}[family]
        return cls(ip, tok, video_processor=None)
    if family == "internvl":
        ip = tf.GotOcr2ImageProcessorPil(size={"height": s, "width": s}, crop_to_patches=False)
        return tf.InternVLProcessor(ip, tok, video_processor=None, image_seq_length=_n_internvl(cfg, 1))
    if family == "gemma3":
        ip = tf.Gemma3ImageProcessorPil(size={"height": s, "width": s})
        return tf.Gemma3Processor(ip, tok, image_seq_length=cfg.mm_tokens_per_image)
    if family in ("idefics3", "smolvlm"):
        cls_ip = tf.Idefics3ImageProcessorPil if family == "idefics3" else tf.SmolVLMImageProcessorPil
        ip = cls_ip(size={"longest_edge": s}, max_image_size={"longest_edge": s}, do_image_splitting=False)
        if family == "idefics3":
            return tf.Idefics3Processor(ip, tok, image_seq_len=_n_idefics(cfg, 1))
        return tf.SmolVLMProcessor(ip, tok, video_processor=None, image_seq_len=_n_idefics(cfg, 1))
    if family == "paligemma":
        ip = tf.SiglipImageProcessorPil(size={"height": s, "width": s})
        return tf.PaliGemmaProcessor(ip, tok)
    raise NotImplementedError(f"tiny_processor({family!r}) is not implemented")


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------


def _resolve(model_or_family: Any) -> tuple[str, Any, torch.dtype]:
    if isinstance(model_or_family, str):
        return model_or_family, tiny_config(model_or_family), torch.float32
    cfg = model_or_family.config
    return cfg.model_type, cfg, model_or_family.dtype


def _text_lengths(batch_size: int, seq_text: int, ragged: bool) -> list[int]:
    if not ragged:
        return [seq_text] * batch_size
    # Sample 0 is the longest; the others shrink evenly down to about half of it.
    return [seq_text - (i * (seq_text // 2)) // max(1, batch_size - 1) for i in range(batch_size)]


def _pad(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = []
    for r in rows:
        fill = [value] * (width - len(r))
        out.append(fill + r if side == "left" else r + fill)
    return torch.tensor(out, dtype=torch.long)


def _assemble(
    seqs: list[list[int]],
    kinds: list[list[int]],
    padding_side: str,
    with_labels: bool,
    token_type: str,
) -> dict[str, torch.Tensor]:
    """Pad per-sample ids; ``kinds`` marks each token: 0 text, 1 image placeholder, 2 PaliGemma prefix text."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    input_ids = _pad(seqs, PAD_ID, padding_side)
    kind = _pad(kinds, -1, padding_side)  # -1 marks padding
    out = {"input_ids": input_ids, "attention_mask": (kind != -1).long()}
    if token_type == "mm":
        out["mm_token_type_ids"] = (kind == 1).long()
    elif token_type == "image":
        out["token_type_ids"] = (kind == 1).long()
    elif token_type == "prefix" and (kind == 1).any():
        # PaliGemma: 0 = bidirectional prefix (text before the answer + image), 1 = causal suffix.
        out["token_type_ids"] = (kind == 0).long()
    if with_labels:
        labels = input_ids.clone()
        labels[kind != 0] = -100  # no loss on padding, image placeholders or PaliGemma's prefix
        out["labels"] = labels
    return out


def tiny_batch(
    model_or_family: Any,
    *,
    batch_size: int = 2,
    seq_text: int = 8,
    images_per_sample: int = 1,
    padding_side: str = "right",
    ragged: bool = False,
    with_labels: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Model inputs for a tiny model built without a processor.

    Each sample is ``[bos, text..., image block(s), text...]``: ``seq_text`` text tokens (bos included) split
    around ``images_per_sample`` image blocks that hold exactly as many placeholders as the model expects,
    wrapped in the family's start/end tokens (e.g. Qwen's ``<|vision_start|>``). Extra inputs follow the
    family: ``image_sizes`` (LLaVA-NeXT/OneVision, Mistral3), ``batch_num_images`` (OneVision),
    ``image_grid_thw`` + ``mm_token_type_ids`` (Qwen), ``pixel_attention_mask`` (Idefics3/SmolVLM),
    ``token_type_ids`` (Gemma3: 1 on image tokens; PaliGemma: 0 on the prefix, 1 on the suffix).

    ``ragged=True`` gives samples different text lengths, padded on ``padding_side`` with id 0 and
    ``attention_mask`` 0. ``labels`` copy ``input_ids`` with -100 on padding and image placeholders (and, for
    PaliGemma, on the bidirectional prefix, as its processor does)::

        model = tiny_model("llava_next")
        loss = model(**tiny_batch(model, ragged=True, padding_side="left")).loss
    """
    family, cfg, dtype = _resolve(model_or_family)
    fam = _family(family)
    if seq_text < 2:
        raise ValueError("seq_text must be >= 2 (text before and after the image block)")
    if images_per_sample < 1:
        raise ValueError("images_per_sample must be >= 1; use tiny_text_batch for text-only batches")
    gen = torch.Generator().manual_seed(seed)
    n_tok = fam.n_image_tokens(cfg, images_per_sample)
    block = fam.image_block(cfg, n_tok)
    block_kind = [1 if t == IMAGE_ID else 0 for t in block]
    pre_kind = 2 if fam.token_type == "prefix" else 0  # PaliGemma: text before the image is prefix

    seqs, kinds = [], []
    for n_text in _text_lengths(batch_size, seq_text, ragged):
        text = torch.randint(*TEXT_ID_RANGE, (n_text,), generator=gen).tolist()
        n_pre = max(1, n_text // 2)
        pre, post = [BOS_ID, *text[1:n_pre]], text[n_pre:]
        img_ids = block * images_per_sample
        img_kind = [pre_kind if k == 0 else 1 for k in block_kind] * images_per_sample
        seqs.append(pre + img_ids + post)
        kinds.append([pre_kind] * len(pre) + img_kind + [0] * len(post))
    out = _assemble(seqs, kinds, padding_side, with_labels, fam.token_type)
    pix = fam.pixels(cfg, batch_size, images_per_sample, gen)
    pix["pixel_values"] = pix["pixel_values"].to(dtype)
    out.update(pix)
    return out


def tiny_text_batch(
    model_or_family: Any,
    *,
    batch_size: int = 2,
    seq_len: int = 8,
    padding_side: str = "right",
    ragged: bool = False,
    with_labels: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Text-only inputs (``input_ids``, ``attention_mask`` and optionally ``labels``) for any tiny family::

        out = tiny_model("gemma3")(**tiny_text_batch("gemma3", ragged=True, padding_side="left"))
    """
    _resolve(model_or_family)
    gen = torch.Generator().manual_seed(seed)
    seqs, kinds = [], []
    for n in _text_lengths(batch_size, seq_len, ragged):
        seqs.append([BOS_ID, *torch.randint(*TEXT_ID_RANGE, (n - 1,), generator=gen).tolist()])
        kinds.append([0] * n)
    return _assemble(seqs, kinds, padding_side, with_labels, token_type="")
