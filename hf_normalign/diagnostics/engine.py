"""Capture engine: run a VLM over encoded probe samples in batches and collect the LLM's hidden states at the
vision-token positions and at the text-passage positions, for selected layers only.

Layer numbering: :class:`~hf_normalign.model_view.ModelView`; layer K with ``final_norm=True`` is taken after the
final norm, as transformers reports ``hidden_states[-1]`` (and as the MIR reference uses it), with ``False`` before
it, with ``"both"`` both ways in one forward (before in ``vision``/``text``, after in ``vision_normed``/``text_normed``:
what a one-pass run of metrics that disagree needs).
Like ``hidden_states``, a Qwen3-VL layer's output is taken before the deepstack vision features are added
to it. Attention keys (``capture_keys=True``) of layer k are the output of ``layers[k - 1].self_attn.k_proj``:
the keys decoder layer k computes from its input, before RoPE.

Positions: vision = tokens whose id is an image/video placeholder id of the config
(``ArchitectureSpec.vision_token_ids``), after the model's vision features are scattered there; text =
each sample's ``text_mask`` (:mod:`.probes.encoding`).

Throughput: batches are padded on the ``padding_side`` (right by default); padding never changes the
captured values beyond rounding (tested for left and right). ``bucket_by_length=True`` forms the batches
from samples of similar length (:func:`batch_plan`), which cuts the padding. Hooks gather only the selected
rows (one gather per layer for both modalities), and the forward stops after the deepest selected layer, so
the LM head never runs. No attention maps and no KV cache are made.

Most code runs a measurement through :func:`~.runner.run_probe`, which calls :func:`capture`.

Example:
    >>> from hf_normalign.testing import tiny_model, tiny_processor
    >>> from hf_normalign.diagnostics.probes import default_probe
    >>> model, proc = tiny_model("llava"), tiny_processor("llava")
    >>> for batch in capture(model, proc, default_probe(4), layers=[1, -1], batch_size=2, progress=False):
    ...     print(batch.layers, tuple(batch.vision[1].shape), batch.text_sample.unique().tolist())
    [1, 2] (32, 64) [0, 1]
    [1, 2] (32, 64) [2, 3]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model_view import ModelView
from .probes.encoding import EncodedSample, check_samples, pad_token_id, prepare_probe, select_text_tokens
from .probes.probe import Probe, ProbeSample

__all__ = ["CaptureBatch", "batch_plan", "capture"]


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
        vision_normed / text_normed: layer K after the final norm (``final_norm="both"`` only; else None).

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
    vision_normed: torch.Tensor | None = None
    text_normed: torch.Tensor | None = None


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


class _StopForward(Exception):
    """Raised by the last hook: nothing after the deepest selected layer is needed."""


class _Recorder:
    """Takes the selected rows of every hooked output: one gather per output for both modalities, then views."""

    def __init__(self, rows: _Rows, dtype: torch.dtype | None, device: torch.device | None, last: tuple[str, int]):
        self.dtype, self.device, self.last = dtype, device, last
        self.index = torch.cat([rows.vision_flat, rows.text_flat])
        self.split = rows.vision_flat.shape[0]
        self.vision: dict[tuple[str, int], torch.Tensor] = {}
        self.text: dict[tuple[str, int], torch.Tensor] = {}

    def take(self, kind: str, layer: int, hidden: torch.Tensor) -> None:
        if self.index.device != hidden.device:  # once per device (a device map may span several)
            self.index = self.index.to(hidden.device)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index)  # the only copy of the layer
        rows = rows.to(device=self.device or rows.device, dtype=self.dtype or rows.dtype)  # no-op when they match
        self.vision[(kind, layer)], self.text[(kind, layer)] = rows[: self.split], rows[self.split :]
        if (kind, layer) == self.last:
            raise _StopForward


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def _hooks(
    view: ModelView, layers: list[int], final_norm: bool | str, keys: bool, recorder: _Recorder
) -> Iterator[None]:
    decoder = view.layers
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
            if layer == k and final_norm:
                norm = getattr(view.language_model, "norm", None)
                if norm is None:
                    raise ValueError(f"final_norm={final_norm!r} but {view.spec.language_model}.norm does not exist")
                kind = "normed" if final_norm == "both" else "hidden"
                handles.append(
                    norm.register_forward_hook(lambda m, a, out, kind=kind: recorder.take(kind, k, _first(out)))
                )
                if final_norm != "both":
                    continue
            handles.append(
                decoder[layer - 1].register_forward_hook(
                    lambda m, a, out, layer=layer: recorder.take("hidden", layer, _first(out))
                )
            )
        yield
    finally:
        for h in handles:
            h.remove()


def _move(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Pixel values follow the model's dtype (a bf16 model gets bf16 pixels); ids and masks only move.
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


def batch_plan(lengths: Sequence[int], batch_size: int, bucket_by_length: bool = False) -> list[list[int]]:
    """Batches of sample indices: consecutive runs of ``batch_size``, or with ``bucket_by_length`` runs of the
    samples sorted by length (stable), so a batch holds similar lengths and little padding. Indices inside
    a batch are ascending.

    Example:
        >>> batch_plan([5, 9, 5, 9], 2), batch_plan([5, 9, 5, 9], 2, bucket_by_length=True)
        ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if bucket_by_length else list(range(len(lengths)))
    return [sorted(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def capture(
    model: nn.Module,
    processor: Any = None,
    probe: Probe | Sequence[ProbeSample] | Sequence[EncodedSample] | None = None,
    *,
    layers: Iterable[int] | None = None,
    final_norm: bool | str = True,
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
    bucket_by_length: bool = False,
    batches: Sequence[Sequence[int]] | None = None,
) -> Iterator[CaptureBatch]:
    """Yield a :class:`CaptureBatch` per batch of ``probe`` (default: the built-in 100-pair probe).

    Args:
        model: a supported ``...ForConditionalGeneration`` (any dtype, quantised, PEFT-wrapped), or its
            :class:`~hf_normalign.model_view.ModelView` (resolved once by the caller).
        processor: the model's processor; not needed when ``probe`` is a list of :class:`EncodedSample`.
        probe: a :class:`~.probe.Probe`, ``(image, text)`` pairs, or encoded samples.
        layers: layer numbers (module docstring); default 1..K.
        final_norm: layer K after (True) or before (False) the final norm, or ``"both"`` (module docstring).
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
        bucket_by_length: batch samples of similar length together (:func:`batch_plan`); less padding.
        batches: the batches to run, as lists of probe indices (overrides ``batch_size`` and
            ``bucket_by_length``; the runner deals a plan out to processes this way).

    The model runs in eval mode under ``torch.inference_mode()`` with ``use_cache=False`` and its
    train/eval mode is restored after every batch. See the module docstring for an example.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if final_norm not in (True, False, "both"):
        raise ValueError(f"final_norm must be True, False or 'both', got {final_norm!r}")
    view = ModelView.of(model)
    wrapper, base = view.model, view.base
    selected = view.resolve_layers(layers, include_embeddings=include_embeddings)
    samples = prepare_probe(processor, probe, prompt=prompt, progress=progress)
    vision_ids = view.vision_token_ids
    check_samples(samples, vision_ids)
    samples = select_text_tokens(samples, vision_ids, text_tokens)
    pad_id = pad_token_id(processor, base, vision_ids)
    run_device = torch.device(device) if device is not None else view.input_device
    out_device = torch.device(output_device) if output_device is not None else None
    deepest = selected[-1]
    normed = final_norm == "both" and deepest == view.num_layers
    last = ("normed" if normed else "hidden", deepest)
    if batches is None:
        batches = batch_plan([s.input_ids.shape[0] for s in samples], batch_size, bucket_by_length)
    for indices in tqdm(batches, desc="capture", unit="batch", disable=not progress, leave=False):
        indices = [int(i) for i in indices]
        chunk = [samples[i] for i in indices]
        inputs, text_mask = _collate(chunk, pad_id, padding_side)
        attention = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        rows = _rows(inputs["input_ids"], attention, text_mask, vision_ids, indices)
        recorder = _Recorder(rows, dtype, out_device, last)
        was_training = wrapper.training
        wrapper.eval()
        try:
            with _hooks(view, selected, final_norm, capture_keys, recorder), torch.inference_mode():
                wrapper(**_move(inputs, run_device, base.dtype), use_cache=False)
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
            vision_normed=recorder.vision[last] if normed else None,
            text_normed=recorder.text[last] if normed else None,
        )
