"""MIR (Modality Integration Rate) of a model: capture features over a probe, then the exact maths.

``mir(model, processor)`` runs the model over the probe in batches (:func:`~..runner.run_probe`), takes the
hidden states at vision and text positions of every decoder layer (layers 1..K, the reference's
``hidden_states[1:]``; layer K after the final norm unless ``final_norm=False``) and computes MIR with
:func:`..maths.mir.mir_from_features` (or :class:`..maths.mir.StreamingMIR`). Text is the passage
(default) or, ``text_tokens="after_image"``, every token after the image, as the reference script.

``preset="reference"`` runs the reference script's recipe (shikiw/Modality-Integration-Rate ``mir.py``):
the vicuna_v1 prompt ``"<system> USER: <image>\n ASSISTANT: {passage}</s>"`` (:data:`REFERENCE_PROMPT`),
text = every token after the image, 3-sigma outliers replaced by the median with torch statistics,
text-centric scale on, base-10 log, last layer after the final norm. With ``sqrt="exact"`` (default)
it equals the script's accurate mode (``--mode accurate``, scipy ``sqrtm``) to float32 round-off on the
same features; the script's default fast mode differs by its own round-off (docs/mir.md).

Memory:

- ``outliers="replace_median"`` (the reference behaviour, default) needs every token of a layer at
  once (the per-dimension median). Features are kept on the host in the model's dtype for at most
  ``max_feature_gb`` GiB at a time: when all layers do not fit, the probe runs once per group of
  layers (each pass stops after its deepest layer), so memory is bounded by the budget, not by K.
  Each layer's FID is computed on ``stats_device`` (default: the model's device) in float64.
- ``outliers="drop"`` / ``"none"`` stream by default (``streaming=None``): float64 running moments
  (2 d^2 per layer) instead of features, so memory does not grow with the number of samples;
  ``"drop"`` runs the probe twice (outlier bounds need all norms first).

Example:
    >>> from hf_normalign.testing import tiny_model, tiny_processor
    >>> result = mir(tiny_model("llava"), tiny_processor("llava"), num_samples=8, progress=False)
    >>> result.layers, result.num_samples, result.settings["final_norm"]
    ([1, 2], 8, True)

Command line: ``normalign mir MODEL [--preset reference] [--images DIR --texts PATH --num-samples N --json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ...console import emit
from ...modeling import get_base_model
from ...persistence.staging import write_file_atomically
from ..engine import CaptureBatch
from ..maths.frechet import SqrtMethod
from ..maths.mir import MIRResult, StreamingMIR, mir_from_features
from ..model_facts import model_input_device, resolve_layers, vision_token_ids
from ..probes.encoding import (
    TEXT_TOKENS,
    EncodedSample,
    check_samples,
    image_placeholder,
    prepare_probe,
    probe_description,
    select_text_tokens,
)
from ..probes.probe import Probe, load_probe
from ..runner import Accumulator, CaptureRequest, ProcessGroup, RunOptions, run_probe

__all__ = ["PRESETS", "REFERENCE_PROMPT", "FeatureAccumulator", "MIRAccumulator", "mir"]

PRESETS: tuple[str, ...] = ("reference",)
# The vicuna_v1 conversation of the reference script (LLaVA's conv_vicuna_v1, image then passage as the
# assistant turn, closed by sep2 "</s>"); {image} becomes the processor's image placeholder.
REFERENCE_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: {image}\n ASSISTANT: {text}</s>"
)
# What preset="reference" fixes: argument -> the reference script's value.
_REFERENCE_FIXED: dict[str, Any] = {
    "outliers": "replace_median",
    "outlier_stats": "torch",
    "outlier_threshold": 3.0,
    "text_scale": True,
    "final_norm": True,
    "log_base": 10,
    "include_embeddings": False,
}

_LAYER_NUMBERING = "hidden_states index: 0 = LLM input, k = output of decoder layer k (1-based)"


def mir(
    model: nn.Module,
    processor: Any = None,
    probe: Probe | Sequence[Any] | None = None,
    *,
    num_samples: int | None = 100,
    batch_size: int = 8,
    final_norm: bool = True,
    layers: Iterable[int] | None = None,
    include_embeddings: bool = False,
    outliers: str = "replace_median",
    sqrt: SqrtMethod = "exact",
    log_base: float = 10,
    outlier_threshold: float | None = None,
    outlier_stats: str = "torch",
    text_scale: bool = True,
    text_tokens: str | None = None,
    preset: str | None = None,
    streaming: bool | None = None,
    seed: int = 0,
    prompt: str | None = None,
    padding_side: str = "right",
    device: str | torch.device | None = None,
    stats_device: str | torch.device | None = None,
    max_feature_gb: float | None = 8.0,
    progress: bool = True,
    accelerator: Any = None,
) -> MIRResult | None:
    """Modality Integration Rate of ``model`` on ``probe`` (default: the built-in offline probe).

    Args:
        model: a supported VLM (``...ForConditionalGeneration``), any dtype, quantised or PEFT-wrapped.
        processor: its processor (not needed for a list of :class:`~..probes.encoding.EncodedSample`).
        probe: ``None``, a :class:`~..probes.probe.Probe`, ``(image, text)`` pairs or encoded samples.
        num_samples: pairs used, a seeded subset (``seed``) when the probe is larger; ``None``: all.
        batch_size: samples per forward pass (results agree across batch sizes to rounding).
        final_norm: take layer K after the final norm (as transformers reports it and the reference
            uses it) or before it.
        layers / include_embeddings: layers to use (numbering in :mod:`..model_facts`); default 1..K.
        outliers, sqrt, log_base, outlier_threshold, outlier_stats, text_scale: as
            :func:`~..maths.mir.mir_from_features` (defaults: 3-sigma replace-median with torch statistics,
            text-centric scale on, exact square root).
        text_tokens: ``"passage"`` (default) or ``"after_image"`` (every token after the image, template
            and end-of-sequence tokens included), see :mod:`..probes.encoding`.
        preset: ``"reference"``: the reference script's recipe (module docstring). It sets ``prompt`` and
            ``text_tokens="after_image"``; passing another prompt, text_tokens or any of outliers /
            outlier_stats / outlier_threshold / text_scale / final_norm / log_base / include_embeddings
            that differs from the reference raises ``ValueError``. ``sqrt`` and ``layers`` stay yours.
        streaming: bounded-memory accumulation (``"drop"``/``"none"`` only); default: on for those.
        prompt, padding_side, device: as :func:`~..engine.capture`.
        stats_device: where float64 statistics are computed (default: the model's device).
        max_feature_gb: host budget for the stored features of the non-streaming path; ``None``:
            capture all layers in one pass whatever their size.
        progress: tqdm progress bars.
        accelerator: an ``accelerate.Accelerator`` of several processes (``accelerate launch``), each holding
            the model: the probe's batches are dealt out to the processes (batch i to process
            i % num_processes, the batches one process would form), each captures its own, and the
            statistics are merged exactly on the main process, which computes the distances (streaming:
            Chan-merged moments; otherwise the features, gathered in probe order). Every process must call
            ``mir`` with the same arguments; the result equals one process's to float64 round-off.

    Returns:
        :class:`~..maths.mir.MIRResult` (``None`` on the other processes of an ``accelerator``); ``settings``
        also records ``final_norm``, ``batch_size``, the probe, the model and the layer numbering.
        JSON: ``result.to_dict()``.

    Raises:
        ValueError: an empty probe or fewer than 2 pairs, an image that does not decode (naming the file), a
            passage over the encoding limit (naming it), a prompt without vision tokens, fewer than 2 tokens of a
            modality, non-finite features (naming the layer).
    """
    given = {
        "outliers": outliers,
        "outlier_stats": outlier_stats,
        "outlier_threshold": 3.0 if outlier_threshold is None else outlier_threshold,
        "text_scale": text_scale,
        "final_norm": final_norm,
        "log_base": log_base,
        "include_embeddings": include_embeddings,
    }
    text_tokens, prompt = _apply_preset(preset, given, text_tokens, prompt, processor, probe)
    base = get_base_model(model)
    selected = resolve_layers(base, layers, include_embeddings=include_embeddings)
    samples = prepare_probe(processor, probe, num_samples=num_samples, seed=seed, prompt=prompt, progress=progress)
    if len(samples) < 2:
        raise ValueError(
            f"MIR compares vision and text tokens over several image-text pairs and needs at least 2, got "
            f"{len(samples)}: one pair's covariances describe a single image and passage. Pass num_samples >= 2 "
            "(and a probe that large); the MIR paper found N >= 20 pairs stable."
        )
    vision_ids = vision_token_ids(base)
    check_samples(samples, vision_ids)
    samples = select_text_tokens(samples, vision_ids, text_tokens)
    n_vision = sum(s.num_vision_tokens(vision_ids) for s in samples)
    n_text = sum(s.num_text_tokens for s in samples)
    for what, n in (("vision", n_vision), ("text", n_text)):
        if n < 2:
            raise ValueError(f"MIR needs at least 2 {what} tokens over the probe set, got {n}")
    if streaming is None:
        streaming = outliers != "replace_median"
    extra = {
        "final_norm": final_norm,
        "batch_size": batch_size,
        "padding_side": padding_side,
        "probe": probe_description(probe, len(samples), seed),
        "model": str(getattr(base.config, "_name_or_path", "") or type(base).__name__),
        "model_dtype": str(base.dtype).removeprefix("torch."),
        "layer_numbering": _LAYER_NUMBERING,
        "text_tokens": text_tokens,
        "prompt": prompt if prompt is not None else "chat template",
        "preset": preset,
    }
    maths = {
        "outliers": outliers,
        "sqrt": sqrt,
        "log_base": log_base,
        "outlier_threshold": outlier_threshold,
        "outlier_stats": outlier_stats,
        "text_scale": text_scale,
    }
    run = RunOptions(batch_size=batch_size, device=device, padding_side=padding_side, progress=progress)
    if streaming:
        stats = StreamingMIR(**maths, layer_indices=selected, device=stats_device, extra_settings=extra)
        merged = run_probe(
            model, processor, samples, MIRAccumulator(stats, selected, final_norm), run, accelerator=accelerator
        )
        return None if merged is None else merged.result()

    hidden = base.config.get_text_config().hidden_size
    itemsize = torch.empty((), dtype=base.dtype).element_size()
    per_layer = (n_vision + n_text) * hidden * itemsize
    group = len(selected) if max_feature_gb is None else max(1, int(max_feature_gb * 2**30 // per_layer))

    def features(layers_: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
        acc = FeatureAccumulator(layers_, final_norm)
        merged = run_probe(model, processor, samples, acc, run, accelerator=accelerator)
        return None if merged is None else merged.result()

    groups = [selected[i : i + group] for i in range(0, len(selected), group)]
    if not ProcessGroup(accelerator).is_main:  # send this process's features, group by group, as the main one asks
        for layers_ in groups:
            features(layers_)
        return None
    target = torch.device(stats_device) if stats_device is not None else model_input_device(base)
    store = _LayerStore(features, groups, target)
    return mir_from_features(
        _LayerView(store, selected, 0),
        _LayerView(store, selected, 1),
        **maths,
        layer_indices=selected,
        num_samples=len(samples),
        extra_settings=extra,
    )


class MIRAccumulator(Accumulator):
    """The streaming MIR statistics (:class:`~..maths.mir.StreamingMIR`) fed by the probe runner.

    Example:
        >>> from hf_normalign.diagnostics.maths.mir import StreamingMIR
        >>> MIRAccumulator(StreamingMIR(outliers="drop", layer_indices=[1, 2]), [1, 2]).passes
        2
    """

    def __init__(self, stats: StreamingMIR, layers: Sequence[int], final_norm: bool = True) -> None:
        self.stats = stats
        self.request = CaptureRequest(tuple(layers), final_norm=final_norm, dtype=None)
        self.passes = stats.passes_required

    def update(self, batch: CaptureBatch) -> None:
        layers = self.request.layers
        self.stats.update(
            [batch.vision[k] for k in layers], [batch.text[k] for k in layers], num_samples=len(batch.sample_indices)
        )

    def merge(self, other: MIRAccumulator) -> None:
        self.stats.merge(other.stats)

    def end_pass(self) -> None:
        self.stats.end_pass()

    def result(self) -> MIRResult:
        return self.stats.result()


class FeatureAccumulator(Accumulator):
    """Every vision and text row of the selected layers, kept on the host in the model's dtype; ``result()``
    gives layer -> (vision, text) with the rows in probe order (sample, then position), whatever the batches."""

    def __init__(self, layers: Sequence[int], final_norm: bool = True) -> None:
        self.request = CaptureRequest(tuple(layers), final_norm=final_norm, dtype=None, output_device="cpu")
        self.samples: dict[str, list[torch.Tensor]] = {"vision": [], "text": []}
        self.rows: dict[str, dict[int, list[torch.Tensor]]] = {"vision": {}, "text": {}}

    def update(self, batch: CaptureBatch) -> None:
        for kind, sample, feats in (
            ("vision", batch.vision_sample, batch.vision),
            ("text", batch.text_sample, batch.text),
        ):
            self.samples[kind].append(sample)
            for k in self.request.layers:
                self.rows[kind].setdefault(k, []).append(feats[k])

    def merge(self, other: FeatureAccumulator) -> None:
        for kind in ("vision", "text"):
            self.samples[kind] += other.samples[kind]
            for k, rows in other.rows[kind].items():
                self.rows[kind].setdefault(k, []).extend(rows)

    def result(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        order = {kind: torch.cat(self.samples[kind]).argsort(stable=True) for kind in ("vision", "text")}
        return {
            k: tuple(torch.cat(self.rows[kind][k])[order[kind]] for kind in ("vision", "text"))  # type: ignore[misc]
            for k in self.request.layers
        }


def _apply_preset(
    preset: str | None, given: dict[str, Any], text_tokens: str | None, prompt: str | None, processor: Any, probe: Any
) -> tuple[str, str | None]:
    """(text_tokens, prompt) after ``preset``; ``ValueError`` for a preset value the caller overrode."""
    if preset is None:
        text_tokens = "passage" if text_tokens is None else text_tokens
        if text_tokens not in TEXT_TOKENS:
            raise ValueError(f"text_tokens must be one of {', '.join(TEXT_TOKENS)}, got {text_tokens!r}")
        return text_tokens, prompt
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    clashes = [f"{k}={given[k]!r}" for k, v in _REFERENCE_FIXED.items() if given[k] != v]
    if prompt is not None:
        clashes.append("prompt")
    if text_tokens not in (None, "after_image"):
        clashes.append(f"text_tokens={text_tokens!r}")
    if clashes:
        raise ValueError(
            f"preset='reference' fixes {', '.join(clashes)} to the reference script's values; "
            "drop those arguments or the preset"
        )
    items = list(probe.samples if isinstance(probe, Probe) else probe or [])
    if processor is None or (items and isinstance(items[0], EncodedSample)):
        raise ValueError(
            "preset='reference' builds its own prompt and needs a processor and a probe of image-text pairs"
        )
    return "after_image", REFERENCE_PROMPT.replace("{image}", image_placeholder(processor))


class _LayerStore:
    """Per-layer (vision, text) features, captured one group of layers at a time on first access.

    ``mir_from_features`` walks the layers in order, so each group is captured once and the previous
    group is released before the next capture: host memory holds one group, the stats device one layer.
    """

    def __init__(
        self,
        run: Callable[[list[int]], dict[int, tuple[torch.Tensor, torch.Tensor]] | None],
        groups: list[list[int]],
        device: torch.device,
    ) -> None:
        self._run, self._groups, self._device = run, groups, device
        self._group_of = {k: i for i, g in enumerate(groups) for k in g}
        self._loaded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, layer: int, modality: int) -> torch.Tensor:
        if layer not in self._loaded:
            self._loaded = {}  # release the previous group before capturing the next
            self._loaded = self._run(self._groups[self._group_of[layer]]) or {}
        return self._loaded[layer][modality].to(self._device)


class _LayerView(Sequence[torch.Tensor]):
    """One modality of a :class:`_LayerStore` as the list of per-layer features mir_from_features takes."""

    def __init__(self, store: _LayerStore, layers: list[int], modality: int) -> None:
        self._store, self._layers, self._modality = store, layers, modality

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self._store.get(self._layers[i], self._modality)


# ----------------------------------------------------------------------------------------------------------
# Command line: normalign mir MODEL ...
# ----------------------------------------------------------------------------------------------------------


def _launched_accelerator(device: str) -> Any:
    """The ``accelerate.Accelerator`` of an ``accelerate launch`` with several processes; None for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if device not in ("cpu", "cuda"):
        raise ValueError(
            f"--device {device}: under accelerate launch each process runs its own copy of the model on its own "
            "device; pass --device cpu or cuda, or leave --device out"
        )
    from accelerate import Accelerator

    return Accelerator(cpu=device == "cpu")


def _main(args: argparse.Namespace) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = _launched_accelerator(device)
    kwargs: dict[str, Any] = {"dtype": args.dtype, "device_map": device if accelerator is None else accelerator.device}
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    probe = None  # read first: a bad texts file is reported before the model loads
    if args.images is not None:
        probe = load_probe(args.images, args.texts, num_samples=args.num_samples, seed=args.seed)
    model = AutoModelForImageTextToText.from_pretrained(args.model, **kwargs)
    processor = AutoProcessor.from_pretrained(args.model)
    result = mir(
        model,
        processor,
        probe,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        final_norm=not args.no_final_norm,
        layers=args.layers,
        include_embeddings=args.include_embeddings,
        outliers=args.outliers,
        outlier_stats=args.outlier_stats,
        text_scale=not args.no_text_scale,
        text_tokens=args.text_tokens,
        preset=args.preset,
        sqrt=args.sqrt,
        log_base=args.log_base,
        streaming=args.streaming,
        seed=args.seed,
        prompt=args.prompt,
        progress=not args.no_progress,
        accelerator=accelerator,
    )
    if result is not None:  # the main process
        emit(result)
        if args.json is not None:
            write_file_atomically(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
            emit(f"wrote {args.json}")
    if accelerator is not None:  # leave together: a process exiting with the group open aborts the launch
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return 0
