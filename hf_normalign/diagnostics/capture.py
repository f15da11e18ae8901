"""Capture engine: run a VLM over a probe set in batches and collect the LLM's hidden states at the
vision-token positions and at the text-passage positions, for selected layers only.

Shared by the diagnostics (MIR, norm profiles, key-space gap, visual degradation).

Layer numbering (the index into ``outputs.hidden_states`` of transformers)::

    layer 0          the LLM input: token embeddings with the projected vision features in place
                     (only when asked for: ``include_embeddings=True`` or 0 in ``layers``)
    layer k, 1..K    the output of decoder layer k (1-based; module ``layers[k - 1]``)
    layer K          with ``final_norm=True`` after the final norm, as transformers reports
                     ``hidden_states[-1]`` (and as the MIR reference uses it); with ``False`` before it

Negative numbers count from the end (-1 is K). Like ``hidden_states``, a Qwen3-VL layer's output is
taken before the deepstack vision features are added to it. Attention keys (``capture_keys=True``) of layer k
are the output of ``layers[k - 1].self_attn.k_proj``: the keys decoder layer k computes from its
input, before RoPE.

Positions:

- vision: tokens whose id is an image/video placeholder id of the config
  (``ArchitectureSpec.vision_token_ids``); after the model's vision features are scattered there;
- text, ``text_tokens="passage"`` (default): the tokens of the probe passage only. The prompt is built as
  ``[processor(prefix with the image)] + [tokenizer(passage)] + [tokenizer(suffix)]`` where prefix and
  suffix come from the chat template (or ``prompt``) around the passage, so the passage positions are
  exact by construction; chat-template and system tokens belong to neither set;
- text, ``text_tokens="after_image"``: every token after the last vision token of the sample, template
  tokens and end-of-sequence included (padding excluded), which is what the MIR reference script
  counts as text (it takes the rows after its 576 image positions).

Batches are padded on the right by default (``padding_side``); padding never changes the captured
values beyond rounding (tested for left and right). Hooks record only the selected rows, and the
forward stops after the last selected layer, so the LM head never runs. No attention maps and no
KV cache are made.

Processor-free use: pass a list of :class:`EncodedSample` (model inputs of one sample plus a boolean
mask of its passage tokens) instead of a probe; this also covers families without a processor here.

Example:
    >>> from hf_normalign.testing import tiny_model, tiny_processor
    >>> from hf_normalign.diagnostics.probe import default_probe
    >>> model, proc = tiny_model("llava"), tiny_processor("llava")
    >>> for batch in capture(model, proc, default_probe(4), layers=[1, -1], batch_size=2, progress=False):
    ...     print(batch.layers, tuple(batch.vision[1].shape), batch.text_sample.unique().tolist())
    [1, 2] (32, 32) [0, 1]
    [1, 2] (32, 32) [2, 3]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..registry import get_spec
from .probe import DEFAULT_PROBE_SIZE, Probe, ProbeSample, default_probe, sample_indices

__all__ = [
    "TEXT_TOKENS",
    "CaptureBatch",
    "EncodedSample",
    "capture",
    "check_samples",
    "encode_probe",
    "model_input_device",
    "num_layers",
    "prepare_probe",
    "resolve_layers",
    "select_text_tokens",
    "vision_token_ids",
]

TEXT_TOKENS: tuple[str, ...] = ("passage", "after_image")

# Stands in for the passage while the chat template is rendered; split on afterwards.
_SENTINEL = "NORMALIGNPASSAGESENTINEL"
_DROP_KEYS = ("labels",)  # PaliGemma's processor returns labels; no loss is wanted here


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


@dataclass
class CaptureBatch:
    """Rows captured from one batch.

    Attributes:
        layers: the layer numbers captured (see the module docstring).
        vision / text: layer -> [rows, hidden] features at vision / passage positions.
        vision_sample / text_sample: [rows] index of each row's sample in the encoded probe.
        vision_patch: [rows] index of the vision token within its sample (order of appearance).
        text_token: [rows] index of the token among its sample's text tokens (``text_tokens``).
        sample_indices: probe indices of the samples in this batch.
        vision_keys / text_keys: layer -> [rows, kv_dim] ``k_proj`` outputs, when asked for.

    Rows are ordered by sample, then by position. Bookkeeping tensors are on the CPU.
    """

    layers: list[int]
    vision: dict[int, torch.Tensor]
    text: dict[int, torch.Tensor]
    vision_sample: torch.Tensor
    vision_patch: torch.Tensor
    text_sample: torch.Tensor
    text_token: torch.Tensor
    sample_indices: list[int]
    vision_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    text_keys: dict[int, torch.Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Model facts
# ----------------------------------------------------------------------------------------------------------


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers live inside it, so they still run)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def num_layers(model: nn.Module) -> int:
    """K, the number of decoder layers of the LLM."""
    model = _base_model(model)
    return len(get_spec(model).decoder_layers(model))


def resolve_layers(
    model: nn.Module, layers: Iterable[int] | None = None, *, include_embeddings: bool = False
) -> list[int]:
    """Sorted, de-duplicated layer numbers in 0..K (default 1..K, plus 0 with ``include_embeddings``).

    Example:
        >>> from hf_normalign.testing import tiny_model
        >>> resolve_layers(tiny_model("llava"), [-1, 1], include_embeddings=True)
        [0, 1, 2]
    """
    k = num_layers(model)
    chosen = list(range(1, k + 1)) if layers is None else [int(i) for i in layers]
    out = set()
    for i in chosen:
        j = i + k + 1 if i < 0 else i
        if not 0 <= j <= k:
            raise ValueError(f"layer {i} is out of range: this model has layers 0 (embeddings) to {k}, or -1..-{k + 1}")
        out.add(j)
    if include_embeddings:
        out.add(0)
    if not out:
        raise ValueError("no layers selected")
    return sorted(out)


def vision_token_ids(model: nn.Module) -> list[int]:
    """Token ids marking vision positions (image and, where the family has one, video placeholders)."""
    model = _base_model(model)
    return get_spec(model).vision_token_ids(model.config)


def model_input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the device of the input embedding (the first device under a device map)."""
    model = _base_model(model)
    weight = getattr(get_spec(model).input_embeddings(model), "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


# ----------------------------------------------------------------------------------------------------------
# Encoding a probe
# ----------------------------------------------------------------------------------------------------------


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _image_placeholder(processor: Any) -> str:
    # Gemma3 expands its begin-of-image token; everyone else their image token.
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
        return f"{_image_placeholder(processor)}\n", ""
    if isinstance(rendered, list):
        rendered = rendered[0]
    if rendered.count(_SENTINEL) != 1:
        raise ValueError("the chat template did not render the passage exactly once; pass prompt='... {text} ...'")
    prefix, suffix = rendered.split(_SENTINEL)
    return prefix, suffix


def encode_probe(
    processor: Any, probe: Probe | Sequence[ProbeSample], *, prompt: str | None = None, progress: bool = False
) -> list[EncodedSample]:
    """Model inputs for every pair of ``probe``: the image in the user turn, then the passage.

    ``prompt`` overrides the chat template: a string with ``{text}`` where the passage goes and the
    model's image placeholder where the image goes, e.g. ``"USER: <image>\\n{text} ASSISTANT:"``.
    Without a chat template the prompt is ``"<image placeholder>\\n{text}"``. Spaces ending the
    prefix move to the start of the passage, so the passage tokenizes as it would in running text.

    Example:
        >>> from hf_normalign.testing import tiny_processor
        >>> from hf_normalign.diagnostics.probe import default_probe
        >>> proc = tiny_processor("llava")
        >>> s = encode_probe(proc, default_probe()[:1])[0]
        >>> proc.tokenizer.decode(s.input_ids[s.text_mask]).startswith("The town council")
        True
    """
    if processor is None:
        raise ValueError("a processor is needed to encode a probe (or pass a list of EncodedSample)")
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
        inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k not in _DROP_KEYS}
        passage = tokenizer(lead + sample.text, add_special_tokens=False)["input_ids"]
        if not passage:
            raise ValueError(f"{sample.name}: the passage has no tokens")
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
) -> list[EncodedSample]:
    """Encoded samples for a probe: ``None`` (the built-in probe), a :class:`~.probe.Probe`,
    ``(image, text)`` pairs, or encoded samples (passed through). ``num_samples`` keeps a seeded subset
    (:func:`~.probe.sample_indices`, same pairs for the same seed); ``None`` keeps all.

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
    return encode_probe(processor, samples, prompt=prompt, progress=progress)


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


# ----------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------


def _pad_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    pad = []
    for have, want in zip(reversed(t.shape[1:]), reversed(shape[1:]), strict=True):
        pad += [0, want - have]
    return nn.functional.pad(t, pad) if any(pad) else t


def _collate(
    samples: Sequence[EncodedSample], pad_id: int, padding_side: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One batch of inputs and the [B, L] passage mask, padded on ``padding_side``."""
    lengths = [s.input_ids.shape[0] for s in samples]
    width = max(lengths)
    token_keys = [k for k, v in samples[0].inputs.items() if v.shape == samples[0].inputs["input_ids"].shape]
    batch: dict[str, torch.Tensor] = {}
    for key in samples[0].inputs:
        values = [s.inputs.get(key) for s in samples]
        if any(v is None for v in values):
            raise ValueError(f"input {key!r} is missing from some samples of the batch")
        if key in token_keys:
            fill = pad_id if key == "input_ids" else 0
            rows = []
            for v, n in zip(values, lengths, strict=True):
                pad = torch.full((1, width - n), fill, dtype=v.dtype)
                rows.append(torch.cat([pad, v] if padding_side == "left" else [v, pad], dim=1))
            batch[key] = torch.cat(rows)
        else:
            if any(v.ndim != values[0].ndim for v in values):
                raise ValueError(f"input {key!r} has a different number of dims across samples")
            shape = [max(v.shape[d] for v in values) for d in range(values[0].ndim)]
            batch[key] = torch.cat([_pad_to(v, shape) for v in values])
    masks = []
    for s, n in zip(samples, lengths, strict=True):
        pad = torch.zeros(width - n, dtype=torch.bool)
        masks.append(torch.cat([pad, s.text_mask] if padding_side == "left" else [s.text_mask, pad]))
    return batch, torch.stack(masks)


@dataclass
class _Rows:
    """Flat row indices into [B * L, hidden] and their bookkeeping, for one batch."""

    vision_flat: torch.Tensor
    text_flat: torch.Tensor
    vision_sample: torch.Tensor
    vision_patch: torch.Tensor
    text_sample: torch.Tensor
    text_token: torch.Tensor


def _rows(
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    text_mask: torch.Tensor,
    vision_ids: list[int],
    sample_indices: list[int],
) -> _Rows:
    vision_mask = torch.isin(input_ids, torch.tensor(vision_ids)) & attention.bool()
    idx = torch.tensor(sample_indices)

    def book(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = mask.reshape(-1).nonzero().squeeze(1)
        row_of = flat // mask.shape[1]
        within = (mask.long().cumsum(dim=1) - 1).reshape(-1)[flat]  # index among the sample's selected tokens
        return flat, idx[row_of], within

    vf, vs, vp = book(vision_mask)
    tf, ts, tt = book(text_mask)
    return _Rows(vf, tf, vs, vp, ts, tt)


# ----------------------------------------------------------------------------------------------------------
# Hooks and the forward pass
# ----------------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the last hook: nothing after the deepest selected layer is needed."""


class _Recorder:
    def __init__(self, rows: _Rows, dtype: torch.dtype | None, device: torch.device | None, last: tuple[str, int]):
        self.rows, self.dtype, self.device, self.last = rows, dtype, device, last
        self.vision: dict[tuple[str, int], torch.Tensor] = {}
        self.text: dict[tuple[str, int], torch.Tensor] = {}

    def take(self, kind: str, layer: int, hidden: torch.Tensor) -> None:
        flat = hidden.reshape(-1, hidden.shape[-1])
        for store, index in ((self.vision, self.rows.vision_flat), (self.text, self.rows.text_flat)):
            rows = flat[index.to(flat.device)]
            store[(kind, layer)] = rows.to(device=self.device or rows.device, dtype=self.dtype or rows.dtype)
        if (kind, layer) == self.last:
            raise _StopForward


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def _hooks(model: nn.Module, layers: list[int], final_norm: bool, keys: bool, recorder: _Recorder) -> Iterator[None]:
    spec = get_spec(model)
    decoder = spec.decoder_layers(model)
    k = len(decoder)
    handles = []
    try:
        for layer in layers:
            if layer == 0:

                def pre(module, args, kwargs):
                    recorder.take("hidden", 0, args[0] if args else kwargs["hidden_states"])

                handles.append(decoder[0].register_forward_pre_hook(pre, with_kwargs=True))
                continue
            if keys:
                k_proj = getattr(getattr(decoder[layer - 1], "self_attn", None), "k_proj", None)
                if k_proj is None:
                    raise ValueError(f"capture_keys: decoder layer {layer} has no self_attn.k_proj")
                handles.append(
                    k_proj.register_forward_hook(
                        lambda m, a, out, layer=layer: recorder.take("keys", layer, _first(out))
                    )
                )
            target = decoder[layer - 1]
            if layer == k and final_norm:
                target = getattr(spec.get(model, spec.language_model), "norm", None)
                if target is None:
                    raise ValueError(f"final_norm=True but {spec.language_model}.norm does not exist")
            handles.append(
                target.register_forward_hook(lambda m, a, out, layer=layer: recorder.take("hidden", layer, _first(out)))
            )
        yield
    finally:
        for h in handles:
            h.remove()


def _move(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Pixel values follow the model's dtype (a bf16 model gets bf16 pixels); ids and masks only move.
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


def capture(
    model: nn.Module,
    processor: Any = None,
    probe: Probe | Sequence[ProbeSample] | Sequence[EncodedSample] | None = None,
    *,
    layers: Iterable[int] | None = None,
    final_norm: bool = True,
    include_embeddings: bool = False,
    batch_size: int = 8,
    capture_keys: bool = False,
    device: str | torch.device | None = None,
    output_device: str | torch.device | None = None,
    dtype: torch.dtype | None = torch.float32,
    padding_side: str = "right",
    prompt: str | None = None,
    text_tokens: str = "passage",
    progress: bool = True,
) -> Iterator[CaptureBatch]:
    """Yield a :class:`CaptureBatch` per batch of ``probe`` (default: the built-in 100-pair probe).

    Args:
        model: a supported ``...ForConditionalGeneration`` (any dtype, quantised, PEFT-wrapped).
        processor: the model's processor; not needed when ``probe`` is a list of :class:`EncodedSample`.
        probe: a :class:`~.probe.Probe`, ``(image, text)`` pairs, or encoded samples.
        layers: layer numbers (module docstring); default 1..K.
        final_norm: layer K after (True) or before (False) the final norm.
        include_embeddings: add layer 0, the LLM input.
        batch_size: samples per forward pass.
        capture_keys: also record ``k_proj`` outputs of the selected layers >= 1.
        device: where the forward runs (default: the input embedding's device; inputs are moved there).
        output_device: where captured rows go (default: stay where computed).
        dtype: dtype of captured rows (default float32; ``None`` keeps the model's).
        padding_side: "right" or "left".
        prompt: see :func:`encode_probe`.
        text_tokens: ``"passage"`` or ``"after_image"`` (module docstring, :func:`select_text_tokens`).
        progress: tqdm progress bar.

    The model runs in eval mode under ``torch.inference_mode()`` with ``use_cache=False`` and its
    train/eval mode is restored after every batch. See the module docstring for an example.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wrapper, model = model, _base_model(model)
    selected = resolve_layers(model, layers, include_embeddings=include_embeddings)
    samples = prepare_probe(processor, probe, prompt=prompt, progress=progress)
    vision_ids = vision_token_ids(model)
    check_samples(samples, vision_ids)
    samples = select_text_tokens(samples, vision_ids, text_tokens)
    pad_id = _pad_id(processor, model, vision_ids)
    run_device = torch.device(device) if device is not None else model_input_device(model)
    out_device = torch.device(output_device) if output_device is not None else None
    deepest = selected[-1]
    last = ("hidden", deepest)
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="capture", unit="batch", disable=not progress, leave=False):
        chunk = samples[start : start + batch_size]
        indices = list(range(start, start + len(chunk)))
        inputs, text_mask = _collate(chunk, pad_id, padding_side)
        attention = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        rows = _rows(inputs["input_ids"], attention, text_mask, vision_ids, indices)
        recorder = _Recorder(rows, dtype, out_device, last)
        was_training = wrapper.training
        wrapper.eval()
        try:
            with _hooks(model, selected, final_norm, capture_keys, recorder), torch.inference_mode():
                wrapper(**_move(inputs, run_device, model.dtype), use_cache=False)
        except _StopForward:
            pass
        finally:
            wrapper.train(was_training)
        yield CaptureBatch(
            layers=selected,
            vision={k: recorder.vision[("hidden", k)] for k in selected},
            text={k: recorder.text[("hidden", k)] for k in selected},
            vision_sample=rows.vision_sample,
            vision_patch=rows.vision_patch,
            text_sample=rows.text_sample,
            text_token=rows.text_token,
            sample_indices=indices,
            vision_keys={k: recorder.vision[("keys", k)] for k in selected if k > 0 and capture_keys},
            text_keys={k: recorder.text[("keys", k)] for k in selected if k > 0 and capture_keys},
        )


def _pad_id(processor: Any, model: nn.Module, vision_ids: list[int]) -> int:
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
