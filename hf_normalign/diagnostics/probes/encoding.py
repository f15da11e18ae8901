"""Encoding a probe for a model: the prompt around each passage, the exact passage positions, a seeded subset.

The prompt is built as ``[processor(prefix with the image)] + [tokenizer(passage)] + [tokenizer(suffix)]``
where prefix and suffix come from the chat template (or ``prompt``) around the passage, so the passage
positions are exact by construction; chat-template and system tokens belong to neither modality.
``text_tokens="after_image"`` (:func:`select_text_tokens`) instead marks every token after the last vision
token, template tokens and end-of-sequence included, as the MIR reference script counts text.

Processor-free use: a list of :class:`EncodedSample` (model inputs of one sample plus a boolean mask of its
passage tokens) stands for a probe everywhere; this also covers families without a processor here.

Example:
    >>> from hf_normalign.testing import tiny_processor
    >>> samples = prepare_probe(tiny_processor("llava"), None, num_samples=2)
    >>> len(samples), samples[0].num_text_tokens > 0
    (2, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .probe import DEFAULT_PROBE_SIZE, Probe, ProbeSample, default_probe, sample_indices

__all__ = [
    "MAX_PASSAGE_TOKENS",
    "TEXT_TOKENS",
    "EncodedSample",
    "check_samples",
    "encode_probe",
    "image_placeholder",
    "pad_token_id",
    "prepare_probe",
    "probe_description",
    "select_text_tokens",
]

TEXT_TOKENS: tuple[str, ...] = ("passage", "after_image")
# Longest passage encoded by default: a whole CNN/DM story (the MIR paper's texts) fits; a runaway file (50k words)
# is refused before a forward pass tries to allocate attention over it.
MAX_PASSAGE_TOKENS = 4096


# Stands in for the passage while the chat template is rendered; split on afterwards.
_SENTINEL = "NORMALIGNPASSAGESENTINEL"


_NOT_INPUTS = ("labels",)  # a processor may return labels; capture computes no loss


@dataclass
class EncodedSample:
    """Model inputs of one probe pair plus the positions of its text passage.

    Attributes:
        inputs: what a processor returns for a batch of one. Tensors shaped like ``input_ids``
            ([1, seq]) are token-aligned and padded when batching; every other tensor
            (``pixel_values``, ``image_grid_thw``, ``image_sizes``...) is concatenated along dim 0,
            zero-padded in its other dims when they differ (as processors batch them).
        text_mask: bool [seq], True at the passage tokens.
        name: label for messages (file name, dataset row...).

    Example:
        >>> import torch
        >>> s = EncodedSample({"input_ids": torch.tensor([[1, 250, 250, 7, 8]])}, torch.tensor([0, 0, 0, 1, 1]).bool())
        >>> s.num_text_tokens
        2
    """

    inputs: dict[str, torch.Tensor]
    text_mask: torch.Tensor
    name: str = ""

    def __post_init__(self) -> None:
        ids = self.inputs.get("input_ids")
        if ids is None or ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"{self.name or 'sample'}: inputs need input_ids of shape [1, seq]")
        self.text_mask = torch.as_tensor(self.text_mask, dtype=torch.bool).reshape(-1)
        if self.text_mask.shape[0] != ids.shape[1]:
            raise ValueError(
                f"{self.name or 'sample'}: text_mask has {self.text_mask.shape[0]} entries for {ids.shape[1]} tokens"
            )

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"][0]

    @property
    def num_text_tokens(self) -> int:
        return int(self.text_mask.sum())

    def num_vision_tokens(self, vision_ids: Sequence[int]) -> int:
        return int(torch.isin(self.input_ids, torch.tensor(list(vision_ids))).sum())


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def image_placeholder(processor: Any) -> str:
    """The placeholder a prompt writes for the image: the processor's begin-of-image token where it has one
    (a processor that expands the image sequence from it), else its image token."""
    for attr in ("boi_token", "image_token"):
        token = getattr(processor, attr, None) or getattr(_tokenizer(processor), attr, None)
        if isinstance(token, str):
            return token
    raise ValueError(
        f"{type(processor).__name__} has no image_token to build a prompt with; pass prompt='... <image> {{text}}'"
    )


def _prompt_parts(processor: Any, prompt: str | None) -> tuple[str, str]:
    """(prefix, suffix) around the passage: from ``prompt`` ("...{text}..."), else the chat template."""
    if prompt is not None:
        if prompt.count("{text}") != 1:
            raise ValueError(f"prompt must contain '{{text}}' exactly once, got {prompt!r}")
        prefix, suffix = prompt.split("{text}")
        return prefix, suffix
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SENTINEL}]}]
    tokenizer = _tokenizer(processor)
    if getattr(processor, "chat_template", None):
        rendered = processor.apply_chat_template(messages, tokenize=False)
    elif getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    else:  # a base model: image, newline, passage
        return f"{image_placeholder(processor)}\n", ""
    if isinstance(rendered, list):
        rendered = rendered[0]
    if rendered.count(_SENTINEL) != 1:
        raise ValueError("the chat template did not render the passage exactly once; pass prompt='... {text} ...'")
    prefix, suffix = rendered.split(_SENTINEL)
    return prefix, suffix


def encode_probe(
    processor: Any,
    probe: Probe | Sequence[ProbeSample],
    *,
    prompt: str | None = None,
    progress: bool = False,
    max_passage_tokens: int = MAX_PASSAGE_TOKENS,
) -> list[EncodedSample]:
    """Model inputs for every pair of ``probe``: the image in the user turn, then the passage.

    ``prompt`` overrides the chat template: a string with ``{text}`` where the passage goes and the
    model's image placeholder where the image goes, e.g. ``"USER: <image>\\n{text} ASSISTANT:"``.
    Without a chat template the prompt is ``"<image placeholder>\\n{text}"``. Spaces ending the
    prefix move to the start of the passage, so the passage tokenizes as it would in running text.
    A passage longer than ``max_passage_tokens`` tokens is refused (``ValueError`` naming the sample), never
    truncated: truncating would change the text being measured.

    Example:
        >>> from hf_normalign.testing import tiny_processor
        >>> from hf_normalign.diagnostics.probes import default_probe
        >>> proc = tiny_processor("llava")
        >>> s = encode_probe(proc, default_probe()[:1])[0]
        >>> proc.tokenizer.decode(s.input_ids[s.text_mask]).startswith("The town council")
        True
    """
    if processor is None:
        raise ValueError("a processor is needed to encode a probe (or pass a list of EncodedSample)")
    if isinstance(max_passage_tokens, bool) or not isinstance(max_passage_tokens, int) or max_passage_tokens < 1:
        raise ValueError(f"max_passage_tokens must be an integer >= 1, got {max_passage_tokens!r}")
    tokenizer = _tokenizer(processor)
    prefix, suffix = _prompt_parts(processor, prompt)
    lead = prefix[len(prefix.rstrip(" ")) :]
    prefix = prefix.rstrip(" ")
    # As transformers' apply_chat_template: a prompt that already holds BOS gets no second one.
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prefix.startswith(bos))
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    out = []
    for sample in tqdm(probe, desc="encode probe", disable=not progress, leave=False):
        image = sample.load_image()
        enc = processor(text=[prefix], images=[image], return_tensors="pt", add_special_tokens=add_special)
        inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k not in _NOT_INPUTS}
        passage = tokenizer(lead + sample.text, add_special_tokens=False)["input_ids"]
        if not passage:
            raise ValueError(f"{sample.name}: the passage has no tokens")
        if len(passage) > max_passage_tokens:
            raise ValueError(
                f"{sample.name}: the passage has {len(passage)} tokens, more than max_passage_tokens="
                f"{max_passage_tokens}. Shorten it, or encode the probe with a higher limit, "
                "prepare_probe(processor, probe, max_passage_tokens=N), and pass the encoded samples as the probe."
            )
        out.append(_append_tokens(inputs, passage, suffix_ids, sample.name))
    return out


def _append_tokens(inputs: dict[str, torch.Tensor], passage: list[int], suffix: list[int], name: str) -> EncodedSample:
    """Append passage and suffix ids to a one-sample encoding; other token-aligned tensors get 1 (mask) or 0."""
    ids = inputs["input_ids"]
    extra = torch.tensor([passage + suffix], dtype=ids.dtype)
    seq_shape = ids.shape
    new = {}
    for key, value in inputs.items():
        if key == "input_ids":
            new[key] = torch.cat([ids, extra], dim=1)
        elif value.shape == seq_shape:  # token-aligned: attention_mask, token_type_ids, mm_token_type_ids...
            fill = 1 if key == "attention_mask" else 0
            new[key] = torch.cat([value, torch.full(extra.shape, fill, dtype=value.dtype)], dim=1)
        else:
            new[key] = value
    mask = torch.zeros(new["input_ids"].shape[1], dtype=torch.bool)
    mask[seq_shape[1] : seq_shape[1] + len(passage)] = True
    return EncodedSample(new, mask, name)


def prepare_probe(
    processor: Any,
    probe: Probe | Sequence[ProbeSample] | Sequence[tuple[Any, str]] | Sequence[EncodedSample] | None = None,
    *,
    num_samples: int | None = None,
    seed: int = 0,
    prompt: str | None = None,
    progress: bool = False,
    max_passage_tokens: int = MAX_PASSAGE_TOKENS,
) -> list[EncodedSample]:
    """Encoded samples for a probe: ``None`` (the built-in probe), a :class:`~.probe.Probe`,
    ``(image, text)`` pairs, or encoded samples (passed through). ``num_samples`` keeps a seeded subset
    (:func:`~.probe.sample_indices`, same pairs for the same seed); ``None`` keeps all. ``max_passage_tokens``:
    as :func:`encode_probe`.

    Example:
        >>> from hf_normalign.testing import tiny_processor
        >>> len(prepare_probe(tiny_processor("llava"), None, num_samples=3))
        3
    """
    if probe is None:
        probe = default_probe(DEFAULT_PROBE_SIZE if num_samples is None else num_samples, seed)
    samples: list[Any] = list(probe.samples if isinstance(probe, Probe) else probe)
    if not samples:
        raise ValueError("empty probe set: there are no samples to run")
    samples = [samples[i] for i in sample_indices(len(samples), num_samples, seed)]
    if all(isinstance(s, EncodedSample) for s in samples):
        return samples
    if all(isinstance(s, tuple) for s in samples):
        samples = Probe.from_pairs(samples).samples
    return encode_probe(processor, samples, prompt=prompt, progress=progress, max_passage_tokens=max_passage_tokens)


def check_samples(samples: Sequence[EncodedSample], vision_ids: Sequence[int]) -> None:
    """``ValueError`` naming the first sample whose prompt holds no vision token."""
    ids = torch.tensor(list(vision_ids))
    for i, s in enumerate(samples):
        if not bool(torch.isin(s.input_ids, ids).any()):
            raise ValueError(
                f"{s.name or f'sample {i}'}: the prompt has no vision tokens (ids {list(vision_ids)}); "
                "does the prompt contain the model's image placeholder?"
            )


def select_text_tokens(
    samples: Sequence[EncodedSample], vision_ids: Sequence[int], text_tokens: str = "passage"
) -> list[EncodedSample]:
    """Samples whose ``text_mask`` marks the text tokens chosen by ``text_tokens``.

    ``"passage"`` keeps the masks as they are; ``"after_image"`` marks every token after the last
    vision token of each sample (call :func:`check_samples` first: a sample needs a vision token).

    Example:
        >>> import torch
        >>> s = EncodedSample({"input_ids": torch.tensor([[1, 9, 250, 250, 7, 8, 2]])}, torch.zeros(7).bool())
        >>> select_text_tokens([s], [250], "after_image")[0].text_mask.long().tolist()
        [0, 0, 0, 0, 1, 1, 1]
    """
    if text_tokens not in TEXT_TOKENS:
        raise ValueError(f"text_tokens must be one of {', '.join(TEXT_TOKENS)}, got {text_tokens!r}")
    if text_tokens == "passage":
        return list(samples)
    ids = torch.tensor(list(vision_ids))
    out = []
    for s in samples:
        last = int(torch.isin(s.input_ids, ids).nonzero()[-1])
        mask = torch.zeros_like(s.text_mask)
        mask[last + 1 :] = True
        out.append(EncodedSample(s.inputs, mask, s.name))
    return out


def pad_token_id(processor: Any, model: Any, vision_ids: list[int]) -> int:
    """A padding id that is not a vision placeholder (the model counts placeholders, masked or not)."""
    tokenizer = _tokenizer(processor) if processor is not None else None
    text_config = model.config.get_text_config()
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(text_config, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        0,
    ):
        if isinstance(candidate, int) and candidate not in vision_ids:
            return candidate
    raise ValueError("no usable padding token id")


def probe_description(probe: Any, n: int, seed: int) -> str:
    """How a probe argument is named in a result's ``settings``."""
    if probe is None:
        return f"default, {n} pairs (seed {seed})"
    if isinstance(probe, Probe):
        return f"{probe.name}, {n} pairs used"
    kind = "encoded samples" if probe and isinstance(probe[0], EncodedSample) else "pairs"
    return f"{n} {kind}"
