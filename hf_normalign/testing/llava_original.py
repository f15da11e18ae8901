"""A tiny checkpoint in the LLaVA training repository's format (``LlavaLlamaForCausalLM`` + MoCa), built offline.

The layout of ``shikiw/LLaVA-v1.5-MoCa-7B`` at toy size: 3 safetensors shards (``model.embed_tokens``,
``model.layers.*``, ``model.norm``, ``lm_head``, ``model.mm_projector.{0,2}``, MoCa at
``model.layers.{i}.modality_layernorm.{scale,shift}``, far from the identity), the original config flags, a
word-level tokenizer without ``<image>``, and a tiny CLIP vision tower in its own folder::

    src, tensors = write_original("tiny")      # tiny/original (the checkpoint), tiny/clip (its vision tower)
    write_original("tiny16", dtype=torch.float16)   # shards in float16, as the released 7B
    # normalign convert tiny/original tiny/converted
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER = 200, 64, 2, 2, 1, 32, 128
IMAGE, PATCH = 32, 8


def _write_clip(folder: str) -> None:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=IMAGE,
        patch_size=PATCH, projection_dim=64,
    )  # fmt: skip
    torch.manual_seed(1)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(
        folder
    )


def _write_tokenizer(folder: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    tok.save_pretrained(folder)


def write_original(
    root: str | os.PathLike, *, use_moca: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[str, dict[str, torch.Tensor]]:
    """Write ``root/original`` and ``root/clip``; return the checkpoint folder and its tensors (original names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    clip, src = os.path.join(root, "clip"), os.path.join(root, "original")
    _write_clip(clip)
    _write_tokenizer(src)
    llama = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in LlamaForCausalLM(llama).state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    state["model.mm_projector.0.weight"] = torch.randn(HIDDEN, 64, generator=g) * 0.1
    state["model.mm_projector.0.bias"] = torch.randn(HIDDEN, generator=g) * 0.1
    state["model.mm_projector.2.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g) * 0.1
    state["model.mm_projector.2.bias"] = torch.randn(HIDDEN, generator=g) * 0.1
    if use_moca:  # far from the identity: a scale in [0.3, 2.3], a shift of size ~1
        for i in range(LAYERS):
            state[f"model.layers.{i}.modality_layernorm.scale"] = 0.3 + 2 * torch.rand(HIDDEN, generator=g)
            state[f"model.layers.{i}.modality_layernorm.shift"] = torch.randn(HIDDEN, generator=g)
    keys = sorted(state)
    names = [f"model-0000{i + 1}-of-00003.safetensors" for i in range(3)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: state[k].to(dtype).contiguous() for k in keys[i::3]}
        save_file(part, os.path.join(src, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {
        **{k: v for k, v in llama.to_dict().items() if k not in ("architectures", "model_type", "dtype")},
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "torch_dtype": str(dtype).removeprefix("torch."),
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_vision_tower": clip,
        "mm_hidden_size": 64,
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False,
        **({"use_moca": True, "moca_std": 0.0} if use_moca else {}),
    }
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    return src, state
