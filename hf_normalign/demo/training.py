"""Stage-1 training and held-out evaluation of one demo variant: encoding the scenes, the shared batch order, the
training loop (projector + plugin, AdamW, warmup + cosine), the held-out metrics and greedy captions.
:mod:`.experiment` runs it for every variant and seed.

Example:
    >>> [len(b) for b in batch_order(4, 2, 3, seed=0)]  # 3 steps of 2 examples, epochs of 4
    [2, 2, 2]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tqdm.auto import tqdm

import hf_normalign as normalign

from ..config import NormAlignConfig
from .data import ATTRIBUTE_WORDS, Scene, attribute_token_ids

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

__all__ = [
    "PROMPT",
    "EncodedSplit",
    "StageSettings",
    "batch_order",
    "encode",
    "evaluate",
    "generate_captions",
    "patched_copy",
    "train_stage1",
    "trainable_parameters",
]

PROMPT = "<image> {caption}"


class StageSettings(Protocol):
    """What stage-1 reads from the demo's config (``DemoConfig`` has these)."""

    lr: float
    warmup_ratio: float
    max_grad_norm: float


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@dataclass
class EncodedSplit:
    """Processor output for a list of scenes, with caption labels and where the attribute words are."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, pixel_values, labels
    attribute: torch.Tensor  # long [n, seq]: 0 elsewhere, k at a caption word of ATTRIBUTE_WORDS' k-th attribute
    unseen: torch.Tensor  # bool [n]: the scene's combination never occurs in training

    def __len__(self) -> int:
        return self.inputs["input_ids"].shape[0]

    def batch(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.inputs.items()}


def encode(processor: LlavaProcessor, scenes: Sequence[Scene], unseen: frozenset = frozenset()) -> EncodedSplit:
    """Encode ``<image> caption </s>`` for every scene; labels on the caption and ``</s>`` only."""
    tokenizer = processor.tokenizer
    texts = [PROMPT.format(caption=s.caption) + tokenizer.eos_token for s in scenes]
    inputs = dict(processor(images=[s.image() for s in scenes], text=texts, return_tensors="pt", padding=True))
    ids = inputs["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    # Caption = everything after the last image token that is not padding.
    after_image = torch.arange(ids.shape[1]) > (ids == image_id).int().cumsum(1).argmax(1, keepdim=True)
    caption = after_image & inputs["attention_mask"].bool()
    inputs["labels"] = ids.masked_fill(~caption, -100)
    attribute = torch.zeros_like(ids)
    for k, token_ids in enumerate(attribute_token_ids(tokenizer).values(), start=1):
        attribute[torch.isin(ids, torch.tensor(token_ids)) & caption] = k
    flags = torch.tensor([s.combination in unseen for s in scenes])
    return EncodedSplit(inputs, attribute, flags)


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The index batches of stage-1 (epochs of seeded permutations), shared by every variant."""
    generator = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []
    while len(order) < steps:
        perm = torch.randperm(num_examples, generator=generator)
        order.extend(perm[i : i + batch_size] for i in range(0, num_examples - batch_size + 1, batch_size))
    return order[:steps]


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------


def trainable_parameters(model: LlavaForConditionalGeneration) -> list[torch.nn.Parameter]:
    """Stage-1 parameters: the projector and the plugin modules (if patched); everything else is frozen."""
    model.requires_grad_(False)
    modules = [model.model.multi_modal_projector]
    if normalign.is_patched(model):
        modules.append(model.normalign)
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def train_stage1(
    model: LlavaForConditionalGeneration,
    data: EncodedSplit,
    order: Sequence[torch.Tensor],
    config: StageSettings,
    *,
    desc: str = "stage-1",
    progress: bool = True,
) -> dict[str, list[float]]:
    """Stage-1 alignment of ``model`` in place on ``data`` in the given batch ``order``.

    Returns per-step ``loss`` (the caption LM loss) and ``pre_loss`` (the unweighted PRe term; empty when
    PRe is off).
    """
    from transformers import get_cosine_schedule_with_warmup

    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = math.ceil(config.warmup_ratio * len(order))
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, len(order))
    pre = normalign.get_config(model).pre if normalign.is_patched(model) else None
    history: dict[str, list[float]] = {"loss": [], "pre_loss": []}
    model.train()
    bar = tqdm(order, desc=desc, disable=not progress, leave=False)
    for index in bar:
        out = model(**data.batch(index))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        total = out.loss.detach()
        if pre is not None:  # outputs.loss = LM + weight * PRe; log the two apart
            history["pre_loss"].append(float(out["pre_loss"]))
            total = total - pre.weight * out["pre_loss"]
        history["loss"].append(float(total))
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", refresh=False)
    model.eval()
    return history


@torch.no_grad()
def evaluate(model: LlavaForConditionalGeneration, data: EncodedSplit, batch_size: int = 64) -> dict[str, float]:
    """Teacher-forced held-out metrics over the caption tokens (and ``</s>``).

    ``caption_loss``: mean token cross-entropy; ``token_accuracy``: argmax = target; ``content_accuracy``: the
    same on the colour, shape and position words, also per attribute (``colour_accuracy``...);
    ``unseen_content_accuracy``: content accuracy on held-out combinations only (NaN when there are none).
    """
    model.eval()
    groups = ["caption", "content", "unseen", *ATTRIBUTE_WORDS]
    hits, counts = dict.fromkeys(groups, 0), dict.fromkeys(groups, 0)
    loss_sum = 0.0
    for start in range(0, len(data), batch_size):
        index = slice(start, start + batch_size)
        batch = data.batch(index)
        targets = batch.pop("labels")[:, 1:]
        logits = model(**batch).logits[:, :-1].float()
        attribute = data.attribute[index][:, 1:]
        masks = {
            "caption": targets != -100,
            "content": attribute > 0,
            "unseen": (attribute > 0) & data.unseen[index][:, None],
            **{name: attribute == k for k, name in enumerate(ATTRIBUTE_WORDS, start=1)},
        }
        hit = logits.argmax(-1) == targets
        loss_sum += float(torch.nn.functional.cross_entropy(logits[masks["caption"]], targets[masks["caption"]],
                                                            reduction="sum"))  # fmt: skip
        for name, mask in masks.items():
            hits[name] += int(hit[mask].sum())
            counts[name] += int(mask.sum())
    accuracy = {name: hits[name] / counts[name] if counts[name] else math.nan for name in groups}
    return {
        "caption_loss": loss_sum / counts["caption"],
        "token_accuracy": accuracy["caption"],
        "content_accuracy": accuracy["content"],
        **{f"{name}_accuracy": accuracy[name] for name in ATTRIBUTE_WORDS},
        "unseen_content_accuracy": accuracy["unseen"],
    }


@torch.no_grad()
def generate_captions(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, images: Sequence[Any]
) -> list[str]:
    """Greedy captions for ``images`` (prompt ``"<image>"``, at most 12 new tokens)."""
    inputs = processor(images=list(images), text=[PROMPT.format(caption="").strip()] * len(images), return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def patched_copy(base: LlavaForConditionalGeneration, config: NormAlignConfig | None, seed: int):
    """A deep copy of ``base``, patched with ``config`` (plugin init seeded)."""
    model = copy.deepcopy(base)
    if config is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            normalign.patch(model, config)
    return model
