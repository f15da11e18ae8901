"""Pieces of the tiny test recipes (`ArchitectureSpec.tiny`) shared by several families.

The tiny vocabulary (256 ids) is shared by all families::

    0 pad, 1 bos, 2 eos, 3 unk        4..199 text (trained BPE pieces, then <unused_k> fillers)
    200..235 Idefics3 / SmolVLM <row_i_col_j> tile tags
    250 image placeholder   251 video placeholder   252 image-block start   253 image-block end
    254 image separator (<global-img>, [IMG_BREAK])   255 <end_of_utterance>

Config keyword sets are checked to build offline with transformers 5.17 and 5.24. They are small enough that
one image is a handful of tokens; special ids point at the layout above so no config id falls outside the
vocab. Every Linear width is a multiple of 64, bitsandbytes' 4-bit block: on CPUs with AVX512-BF16 its
eval-mode kernel repacks the weight per block and fails for narrower layers.
"""

from typing import Any

VOCAB_SIZE = 256
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
TEXT_ID_RANGE = (4, 200)  # random text ids come from here, so they never hit a special token
ROW_COL_FIRST_ID = 200
IMAGE_ID, VIDEO_ID, IMG_START_ID, IMG_END_ID, IMG_SEP_ID, EOU_ID = 250, 251, 252, 253, 254, 255

TEXT = {
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
VIT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
MROPE = {"mrope_section": [2, 3, 3]}  # sums to head_dim / 2
PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def text(model_type: str, **extra: Any) -> dict[str, Any]:
    """The tiny ``text_config`` of an LLM of ``model_type``."""
    return {"model_type": model_type, **TEXT, **extra}


# LLaVA, LLaVA-NeXT, PaliGemma: one <image> token per placeholder, no markers around the block.
IMAGE_SPECIALS = {"image_token": ("<image>", IMAGE_ID)}
IMAGE_RECIPE = {"specials": IMAGE_SPECIALS, "prompt_image": "<image>", "image_block": "plain"}
# LLaVA, LLaVA-NeXT: a CLIP vision tower under a Llama LLM.
LLAVA_CONFIG = {
    "text_config": text("llama"),
    "vision_config": {"model_type": "clip_vision_model", **VIT},
    "image_token_id": IMAGE_ID,
}

# Qwen2-VL, Qwen2.5-VL, Qwen3-VL.
QWEN_IDS = {
    "image_token_id": IMAGE_ID,
    "video_token_id": VIDEO_ID,
    "vision_start_token_id": IMG_START_ID,
    "vision_end_token_id": IMG_END_ID,
}
# What the three Qwen vision towers share (their own keys are added in each family's module).
QWEN_VISION = {"depth": 2, "hidden_size": 64, "num_heads": 2, "spatial_merge_size": 2, "temporal_patch_size": 2}
QWEN_RECIPE = {
    "specials": {
        "image_token": ("<|image_pad|>", IMAGE_ID),
        "video_token": ("<|video_pad|>", VIDEO_ID),
        "vision_start_token": ("<|vision_start|>", IMG_START_ID),
        "vision_end_token": ("<|vision_end|>", IMG_END_ID),
    },
    "prompt_image": "<|vision_start|><|image_pad|><|vision_end|>",
    "image_tokens": "merged_grid",
    "image_block": "wrapped",
    "pixels": "grid_thw",
    "processor": "qwen",
    "token_type": "mm",
}

# Idefics3, SmolVLM.
IDEFICS_CONFIG = {
    "text_config": text("llama"),
    "vision_config": dict(VIT),
    "scale_factor": 2,
    "image_token_id": IMAGE_ID,
    "pad_token_id": PAD_ID,  # the top-level default (128002) is outside the tiny vocab
}
IDEFICS_RECIPE = {
    "specials": {
        "image_token": ("<image>", IMAGE_ID),
        "video_token": ("<video>", VIDEO_ID),
        "fake_image_token": ("<fake_token_around_image>", IMG_START_ID),
        "global_image_token": ("<global-img>", IMG_SEP_ID),
        "end_of_utterance_token": ("<end_of_utterance>", EOU_ID),
    },
    "prompt_image": "<image>",
    "image_tokens": "scaled",
    "image_block": "idefics",
    "pixels": "tiled",
    "processor": "idefics",
    "extra_tokens": tuple(
        (f"<row_{i + 1}_col_{j + 1}>", ROW_COL_FIRST_ID + 6 * i + j) for i in range(6) for j in range(6)
    ),
}
