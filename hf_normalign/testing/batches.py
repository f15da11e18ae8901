"""Random model inputs for tiny models, built without a processor: with images (`tiny_batch`) or text only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..specs._tiny import BOS_ID, IMAGE_ID, PAD_ID, TEXT_ID_RANGE
from .family import Family, recipe
from .models import tiny_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _resolve(model_or_family: PreTrainedModel | str) -> tuple[Family, torch.dtype]:
    if isinstance(model_or_family, str):
        return Family(recipe(model_or_family), tiny_config(model_or_family)), torch.float32
    cfg = model_or_family.config
    return Family(recipe(cfg.model_type), cfg), model_or_family.dtype


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
    fam, dtype = _resolve(model_or_family)
    if seq_text < 2:
        raise ValueError("seq_text must be >= 2 (text before and after the images)")
    if images_per_sample < 1:
        raise ValueError("images_per_sample must be >= 1; use tiny_text_batch for text only")
    gen = torch.Generator().manual_seed(seed)
    block = fam.image_block(fam.image_tokens(images_per_sample)) * images_per_sample
    pre_kind = _PREFIX_KIND if fam.recipe.token_type == "prefix" else _TEXT_KIND
    block_kind = [_IMAGE_KIND if t == IMAGE_ID else pre_kind for t in block]

    seqs, kinds = [], []
    for n_text in _text_lengths(batch_size, seq_text, ragged):
        text = [BOS_ID, *torch.randint(*TEXT_ID_RANGE, (n_text - 1,), generator=gen).tolist()]
        n_pre = n_text // 2
        seqs.append(text[:n_pre] + block + text[n_pre:])
        kinds.append([pre_kind] * n_pre + block_kind + [_TEXT_KIND] * (n_text - n_pre))
    out = _assemble(seqs, kinds, padding_side, with_labels, fam.recipe.token_type)
    pixels = fam.pixels(batch_size, images_per_sample, gen)
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
