"""Tiny configs and randomly initialised tiny models of every family."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from ..specs._tiny import BOS_ID, EOS_ID, PAD_ID
from .family import recipe

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


def tiny_config(family: str, **text_overrides: Any) -> PretrainedConfig:
    """Config of a tiny ``family`` model: vocab 256, hidden 64, 2 decoder layers, one-tile images.

    ``text_overrides`` update ``text_config``; when ``hidden_size`` changes, ``head_dim`` follows it::

        cfg = tiny_config("llava", num_hidden_layers=4, hidden_size=128)
    """
    from transformers import AutoConfig

    tiny = recipe(family)
    kwargs = copy.deepcopy(dict(tiny.config))
    text = kwargs["text_config"]
    if "hidden_size" in text_overrides and "head_dim" not in text_overrides:
        heads = text_overrides.get("num_attention_heads", text["num_attention_heads"])
        text_overrides = {**text_overrides, "head_dim": text_overrides["hidden_size"] // heads}
    text.update(text_overrides)
    # Where the vision side emits the LLM width directly, it has to follow a new text hidden size.
    if tiny.width_key is not None:
        section, key = tiny.width_key
        (kwargs[section] if section else kwargs)[key] = text["hidden_size"]
    mrope = (text.get("rope_scaling") or {}).get("mrope_section")
    if mrope is not None and "rope_scaling" not in text_overrides:
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
