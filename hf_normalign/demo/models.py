"""The demo's model: a real ``LlavaForConditionalGeneration`` built from config, with a loud vision side.

- LLM: llama-style (hidden 64, 4 layers, RMSNorm, Pre-Norm), word-level vocabulary of the task. It is
  pre-trained on text alone (:func:`pretrain_language_model`) before any image is seen, so its embedding
  rows get a learned scale as in a real LLM (not the init's std 0.02).
- Vision tower: a CLIP vision transformer (32x32 px, 8x8 patches: 16 image tokens), randomly initialised
  and frozen. Random patch embeddings keep colour and position information (a random linear map of the
  pixels plus a position embedding), which is all the task needs. The position embeddings are drawn at the
  scale of the patch embeddings (std 0.3), as a trained ViT's are; at the 0.02 init they would be a faint 7%
  of each feature and the captions' positions barely learnable by a projector.
- Loudness, as in real VLMs: LLaVA reads the vision tower's penultimate hidden state (the residual stream;
  CLIP's ``post_layernorm`` never touches it). In real CLIP/SigLIP that stream has grown to L2 norms of tens
  over 24+ layers; in this 2-layer tower it starts at the output of ``pre_layrnorm``, whose norm is about
  ``gain * sqrt(hidden)``. :func:`build_model` sets that gain so the features have norm ``vision_norm`` (40 by
  default); the Pre-Norm encoder layers add updates that are small against it.
- Projector: LLaVA's two-layer MLP, initialised He-normal (fan-in), which carries the feature norm through
  (40 in, 50-65 out, over 100x the text embeddings), as the loud vision tokens of a real LLaVA are.
  transformers' own init (std 0.02) would shrink them to about the text scale and hide the very gap the
  demo is about.

Example:
    >>> from hf_normalign.demo.data import build_tokenizer
    >>> tokenizer = build_tokenizer()
    >>> model = build_model(tokenizer, seed=0)
    >>> processor = build_processor(tokenizer)
    >>> type(model).__name__, model.config.image_token_id == tokenizer.image_token_id
    ('LlavaForConditionalGeneration', True)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .data import IMAGE_TOKEN

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

__all__ = ["ModelSizes", "build_model", "build_processor", "pretrain_language_model", "vision_feature_norm"]

IMAGE_SIDE = 32
PATCH = 8
NUM_IMAGE_TOKENS = (IMAGE_SIDE // PATCH) ** 2
POSITION_EMBEDDING_STD = 0.3  # the random patch embeddings of the demo images have a per-dim std of about 0.29


@dataclass(frozen=True)
class ModelSizes:
    """Widths and depths of the demo model."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_norm: float = 40.0  # L2 norm of the vision features entering the projector


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """``LlavaProcessor`` with a PIL ``CLIPImageProcessor`` resizing to the 32x32 tile (the real processor path).

    ``"<image>"`` in a prompt expands to the 16 patch tokens (CLIP's CLS is counted and then dropped by the
    "default" feature strategy, as in LLaVA-1.5).
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    )
    return LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=PATCH,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, sizes: ModelSizes | None = None
) -> LlavaForConditionalGeneration:
    """A randomly initialised demo LLaVA (see the module docstring), in eval mode; global RNG untouched."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    sizes = sizes or ModelSizes()
    config = LlavaConfig(
        text_config={
            "model_type": "llama",
            "hidden_size": sizes.hidden,
            "intermediate_size": sizes.intermediate,
            "num_hidden_layers": sizes.layers,
            "num_attention_heads": sizes.heads,
            "num_key_value_heads": sizes.kv_heads,
            "head_dim": sizes.hidden // sizes.heads,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": sizes.vision_hidden,
            "intermediate_size": 2 * sizes.vision_hidden,
            "num_hidden_layers": sizes.vision_layers,
            "num_attention_heads": sizes.vision_heads,
            "image_size": IMAGE_SIDE,
            "patch_size": PATCH,
        },
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        with torch.no_grad():
            tower = model.model.vision_tower
            # Loud vision features: LayerNorm output has norm ~ gain * sqrt(width).
            tower.pre_layrnorm.weight.fill_(sizes.vision_norm / math.sqrt(sizes.vision_hidden))
            # Position embeddings at the scale of the patch embeddings, as in a trained ViT; the 0.02 init
            # would leave "where" a faint 7% of each patch feature and position barely learnable.
            nn.init.normal_(tower.embeddings.position_embedding.weight, std=POSITION_EMBEDDING_STD)
            for linear in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
                nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")  # He: keeps the norm through GELU
                nn.init.zeros_(linear.bias)
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def vision_feature_norm(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> tuple[float, float]:
    """Mean L2 norm of the vision features entering the projector and of the projector output."""
    inner = model.model
    with torch.no_grad():
        out = inner.vision_tower(pixel_values, output_hidden_states=True)
        features = out.hidden_states[model.config.vision_feature_layer][:, 1:]
        projected = inner.multi_modal_projector(features)
    return float(features.norm(dim=-1).mean()), float(projected.norm(dim=-1).mean())


def _text_batches(
    lines: Sequence[str], tokenizer: PreTrainedTokenizerFast, batch_size: int, generator: torch.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of ``<s> line </s>`` with labels (padding ignored)."""
    while True:
        order = torch.randperm(len(lines), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            texts = [lines[i] + tokenizer.eos_token for i in order[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            yield {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def pretrain_language_model(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    lines: Sequence[str],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train the LLM (embeddings, decoder, LM head) on text-only ``lines``; returns the loss per step.

    Text-only batches go through the full ``LlavaForConditionalGeneration`` (no ``pixel_values``), so this is
    plain next-token training of the language model; the vision tower and projector are not touched.
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    params = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    batches = _text_batches(lines, tokenizer, batch_size, torch.Generator().manual_seed(seed))
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="pre-train LLM on text", disable=not progress, leave=False):
        loss = model(**next(batches)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses
