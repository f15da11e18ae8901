"""MIR (Modality Integration Rate) of a model: capture features over a probe, then the exact maths.

``mir(model, processor)`` runs the model over the probe in batches (:func:`~..runner.run_probe`), takes the
hidden states at vision and text positions of every decoder layer (layers 1..K, the reference's
``hidden_states[1:]``; layer K after the final norm unless ``final_norm=False``) and computes MIR with
:func:`mir_from_features` (or :class:`StreamingMIR`), both over :mod:`..maths.mir`. Text is the passage
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

Options: :class:`MIROptions` (how MIR is measured) and :class:`~..runner.RunOptions` (how the probe runs); every
option is also a keyword of :func:`mir`. Command line (:mod:`hf_normalign.commands.mir`):
``normalign mir MODEL [--preset reference] [--images DIR --texts PATH --num-samples N --json FILE]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...model_view import ModelView
from ..maths.frechet import SqrtMethod
from ..maths.mir import StreamingMIRStats, mir_parts
from ..options import UNSET, merge_options
from ..probes.encoding import (
    TEXT_TOKENS,
    EncodedSample,
    check_samples,
    image_placeholder,
    prepare_probe,
    probe_description,
    select_text_tokens,
)
from ..probes.probe import Probe
from ..results import Column, Result, Table
from ..runner import MetricRun, ProcessGroup, RunOptions, run_probe
from .mir_capture import FeatureAccumulator, LayerStore, LayerView, MIRAccumulator

__all__ = [
    "PRESETS",
    "REFERENCE_PROMPT",
    "FeatureAccumulator",
    "MIRAccumulator",
    "MIROptions",
    "MIRResult",
    "MIRRun",
    "StreamingMIR",
    "mir",
    "mir_from_features",
    "mir_run",
]

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


@dataclass
class MIRResult(Result):
    """MIR and its per-layer parts.

    Attributes:
        mir: log_base of the sum of per-layer FIDs (-inf when the sum is 0, NaN when it is negative,
            which only ``sqrt="reference_fast"`` can produce).
        per_layer: FID of each layer, in the order of ``layers``.
        layers: layer indices (as given by the caller; 0..K-1 by default).
        num_samples: number of image-text samples behind the features, if known.
        settings: how it was computed (outliers, outlier_threshold, sqrt, log_base, streaming, plus
            whatever the caller added, e.g. final_norm).
        num_vision_tokens / num_text_tokens: tokens per layer that entered the FID (after dropping).
        num_vision_outliers / num_text_outliers: tokens per layer flagged as outliers.
        text_scale: alpha_k = 1 / mean text-token norm per layer.

    Example:
        >>> r = MIRResult(mir=1.0, per_layer=[4.0, 6.0], layers=[1, 2], num_samples=2, settings={})
        >>> MIRResult.from_dict(r.to_dict()) == r
        True
    """

    mir: float
    per_layer: list[float]
    layers: list[int]
    num_samples: int | None
    settings: dict[str, Any]
    num_vision_tokens: list[int] = field(default_factory=list)
    num_text_tokens: list[int] = field(default_factory=list)
    num_vision_outliers: list[int] = field(default_factory=list)
    num_text_outliers: list[int] = field(default_factory=list)
    text_scale: list[float] = field(default_factory=list)

    TABLES = (
        Table(
            "layers",
            "layer",
            (
                Column("per_layer", "FID", ".5g"),
                Column("share", "share", ".1%", report=False),
                Column("num_vision_tokens", "vision tok", "d", report=False),
                Column("num_vision_outliers", "vision outl.", "d", report=False),
                Column("num_text_tokens", "text tok", "d", report=False),
                Column("num_text_outliers", "text outl.", "d", report=False),
            ),
        ),
    )

    @property
    def share(self) -> list[float]:
        """Each layer's FID as a fraction of their sum (NaN when the sum is not positive)."""
        total = sum(self.per_layer)
        return [fid / total if total > 0 else math.nan for fid in self.per_layer]

    def summary(self) -> dict[str, float | None]:
        """Headline number for the report: MIR itself."""
        return {"mir": self.mir}

    def __str__(self) -> str:
        base = self.settings.get("log_base", 10)
        samples = f"{self.num_samples} samples, " if self.num_samples is not None else ""
        how = ", ".join(f"{k}={self.settings[k]}" for k in ("outliers", "sqrt") if k in self.settings)
        summary = (
            f"MIR = {self.mir:.4f} (log{base:g} of the sum of {len(self.per_layer)} per-layer FIDs = "
            f"{sum(self.per_layer):.5g}; {samples}{how})"
        )
        return summary + "\n" + self.format_table()


def mir_from_features(vision_layers: Sequence[Any], text_layers: Sequence[Any], **options: Any) -> MIRResult:
    """MIR from per-layer features as a :class:`MIRResult`; features, keywords (outliers, sqrt, log_base,
    layer_indices, num_samples, outlier_threshold, outlier_stats, text_scale, extra_settings) and maths:
    :func:`~..maths.mir.mir_parts`.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> res = mir_from_features([torch.randn(60, 4, generator=g) + 2], [torch.randn(50, 4, generator=g)])
        >>> res.layers, res.mir > 0
        ([0], True)
    """
    return MIRResult(**mir_parts(vision_layers, text_layers, **options))


class StreamingMIR(StreamingMIRStats):
    """:class:`~..maths.mir.StreamingMIRStats` (MIR batch by batch in bounded memory, its docstring) whose
    :meth:`result` is a :class:`MIRResult`.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> acc = StreamingMIR(outliers="none")
        >>> acc.update([torch.randn(40, 4, generator=g) + 1], [torch.randn(30, 4, generator=g)], num_samples=2)
        >>> acc.result().num_samples
        2
    """

    def result(self) -> MIRResult:
        """The MIR of everything fed so far; ends the last pass if it is still open."""
        return MIRResult(**self.parts())


@dataclass(frozen=True)
class MIROptions:
    """How :func:`mir` measures; one default per option (the reference script's recipe, except ``text_tokens``).

    Attributes:
        final_norm: layer K after the final norm (True, as transformers reports it and the reference uses it).
        layers / include_embeddings: layers to use (:class:`~hf_normalign.model_view.ModelView` numbering);
            default 1..K, without layer 0.
        outliers, sqrt, log_base, outlier_stats, text_scale: as :func:`mir_from_features`: 3-sigma
            replace-median with torch statistics, the exact square root, base 10, the text-centric scale on.
        outlier_threshold: the width of the outlier test; None: 3 standard deviations, or 1.5 IQR for
            ``outliers="iqr"`` (as the reference).
        text_tokens: ``"passage"`` (None, the default) or ``"after_image"`` (:mod:`..probes.encoding`).
        preset: ``"reference"``: the reference script's recipe (module docstring); values it fixes that differ
            from the reference raise ``ValueError``.
        streaming: bounded-memory accumulation (``"drop"``/``"none"`` only); None: on for those.
        stats_device: where float64 statistics are computed (None: the model's input device).
        max_feature_gb: host budget for the stored features of the non-streaming path (8 GiB); None: no limit.

    Example:
        >>> MIROptions(outliers="drop", layers=[-1]).layers
        (-1,)
    """

    final_norm: bool = True
    layers: tuple[int, ...] | None = None
    include_embeddings: bool = False
    outliers: str = "replace_median"
    sqrt: SqrtMethod = "exact"
    log_base: float = 10
    outlier_threshold: float | None = None
    outlier_stats: str = "torch"
    text_scale: bool = True
    text_tokens: str | None = None
    preset: str | None = None
    streaming: bool | None = None
    stats_device: str | torch.device | None = None
    max_feature_gb: float | None = 8.0

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    def maths(self) -> dict[str, Any]:
        """The keywords of :func:`mir_from_features` / :class:`StreamingMIR`."""
        keys = ("outliers", "sqrt", "log_base", "outlier_threshold", "outlier_stats", "text_scale")
        return {k: getattr(self, k) for k in keys}


class MIRRun(MetricRun):
    """:func:`mir` prepared for one model and probe (:class:`~..runner.MetricRun`): streaming moments, or every
    feature row of the selected layers; shareable with other metrics unless the features must be captured in
    several groups of layers (``max_feature_gb``)."""

    name = "mir"

    def __init__(
        self, view: ModelView, samples: list, layers: list[int], options: MIROptions, extra: dict, tokens: int
    ) -> None:
        self.view, self.samples, self.layers, self.options, self.extra = view, samples, layers, options, extra
        self.streaming = options.streaming if options.streaming is not None else options.outliers != "replace_median"
        hidden = view.config.get_text_config().hidden_size
        per_layer = tokens * hidden * torch.empty((), dtype=view.base.dtype).element_size()
        budget = options.max_feature_gb
        group = len(layers) if budget is None else max(1, int(budget * 2**30 // per_layer))
        self.groups = [layers[i : i + group] for i in range(0, len(layers), group)]
        self.shareable = self.streaming or len(self.groups) == 1

    def accumulator(self) -> MIRAccumulator | FeatureAccumulator:
        if self.streaming:
            stats = StreamingMIR(**self.options.maths(), layer_indices=self.layers,
                                 device=self.options.stats_device, extra_settings=self.extra)  # fmt: skip
            return MIRAccumulator(stats, self.layers, self.options.final_norm)
        return FeatureAccumulator(self.groups[0] if len(self.groups) == 1 else self.layers, self.options.final_norm)

    def finish(self, merged: MIRAccumulator | FeatureAccumulator) -> MIRResult:
        if self.streaming:
            return merged.result()
        return self._from_features(lambda layers_: merged.result())

    def _from_features(self, features: Any) -> MIRResult:
        stats_device = self.options.stats_device
        target = torch.device(stats_device) if stats_device is not None else self.view.input_device
        store = LayerStore(features, self.groups, target)
        return mir_from_features(
            LayerView(store, self.layers, 0),
            LayerView(store, self.layers, 1),
            **self.options.maths(),
            layer_indices=self.layers,
            num_samples=len(self.samples),
            extra_settings=self.extra,
        )

    def run(self, model: Any, processor: Any, run: RunOptions, accelerator: Any = None) -> MIRResult | None:
        if self.shareable:
            return super().run(model, processor, run, accelerator)

        def features(layers_: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
            acc = FeatureAccumulator(layers_, self.options.final_norm)
            merged = run_probe(model, processor, self.samples, acc, run, accelerator=accelerator)
            return None if merged is None else merged.result()

        if not ProcessGroup(accelerator).is_main:  # send this process's features, group by group, as the main asks
            for layers_ in self.groups:
                features(layers_)
            return None
        return self._from_features(features)


def mir_run(
    model: nn.Module | ModelView,
    processor: Any = None,
    probe: Probe | Sequence[Any] | None = None,
    *,
    num_samples: int | None = 100,
    seed: int = 0,
    prompt: str | None = None,
    options: MIROptions | None = None,
    run: RunOptions | None = None,
    samples: list[EncodedSample] | None = None,
) -> MIRRun:
    """MIR prepared, not run: the preset applied, the probe encoded and checked (arguments: :func:`mir`); give it
    to :func:`~..runner.run_metrics` to share a probe pass with other metrics.
    ``samples``: the probe already encoded (``prepare_probe(processor, probe, num_samples=..., seed=...,
    prompt=...)``), to share one encoding (and so one pass) between metrics.
    """
    options, run = options or MIROptions(), run or RunOptions()
    text_tokens, prompt = _apply_preset(options, prompt, processor, probe)
    view = ModelView.of(model)
    selected = view.resolve_layers(options.layers, include_embeddings=options.include_embeddings)
    if samples is None:
        samples = prepare_probe(processor, probe, num_samples=num_samples, seed=seed, prompt=prompt,
                                progress=run.progress)  # fmt: skip
    if len(samples) < 2:
        raise ValueError(
            f"MIR compares vision and text tokens over several image-text pairs and needs at least 2, got "
            f"{len(samples)}: one pair's covariances describe a single image and passage. Pass num_samples >= 2 "
            "(and a probe that large); the MIR paper found N >= 20 pairs stable."
        )
    vision_ids = view.vision_token_ids
    check_samples(samples, vision_ids)
    samples = select_text_tokens(samples, vision_ids, text_tokens)
    n_vision = sum(s.num_vision_tokens(vision_ids) for s in samples)
    n_text = sum(s.num_text_tokens for s in samples)
    for what, n in (("vision", n_vision), ("text", n_text)):
        if n < 2:
            raise ValueError(f"MIR needs at least 2 {what} tokens over the probe set, got {n}")
    base = view.base
    extra = {
        "final_norm": options.final_norm,
        "batch_size": run.batch_size,
        "padding_side": run.padding_side,
        "probe": probe_description(probe, len(samples), seed),
        "model": str(getattr(base.config, "_name_or_path", "") or type(base).__name__),
        "model_dtype": str(base.dtype).removeprefix("torch."),
        "layer_numbering": _LAYER_NUMBERING,
        "text_tokens": text_tokens,
        "prompt": prompt if prompt is not None else "chat template",
        "preset": options.preset,
    }
    return MIRRun(view, samples, selected, options, extra, n_vision + n_text)


def mir(
    model: nn.Module,
    processor: Any = None,
    probe: Probe | Sequence[Any] | None = None,
    *,
    num_samples: int | None = 100,
    batch_size: int = UNSET,
    final_norm: bool = UNSET,
    layers: Iterable[int] | None = UNSET,
    include_embeddings: bool = UNSET,
    outliers: str = UNSET,
    sqrt: SqrtMethod = UNSET,
    log_base: float = UNSET,
    outlier_threshold: float | None = UNSET,
    outlier_stats: str = UNSET,
    text_scale: bool = UNSET,
    text_tokens: str | None = UNSET,
    preset: str | None = UNSET,
    streaming: bool | None = UNSET,
    seed: int = 0,
    prompt: str | None = None,
    padding_side: str = UNSET,
    device: str | torch.device | None = UNSET,
    stats_device: str | torch.device | None = UNSET,
    max_feature_gb: float | None = UNSET,
    progress: bool = UNSET,
    accelerator: Any = None,
    options: MIROptions | None = None,
    run: RunOptions | None = None,
) -> MIRResult | None:
    """Modality Integration Rate of ``model`` on ``probe`` (default: the built-in offline probe).

    Args:
        model: a supported VLM (``...ForConditionalGeneration``), any dtype, quantised or PEFT-wrapped.
        processor: its processor (not needed for a list of :class:`~..probes.encoding.EncodedSample`).
        probe: ``None``, a :class:`~..probes.probe.Probe`, ``(image, text)`` pairs or encoded samples.
        num_samples: pairs used, a seeded subset (``seed``) when the probe is larger; ``None``: all.
        final_norm, layers, include_embeddings, outliers, sqrt, log_base, outlier_threshold, outlier_stats,
            text_scale, text_tokens, preset, streaming, stats_device, max_feature_gb: :class:`MIROptions`, where
            each has its one default. ``preset="reference"`` sets ``prompt`` and ``text_tokens="after_image"``;
            passing another prompt, text_tokens or any of outliers / outlier_stats / outlier_threshold /
            text_scale / final_norm / log_base / include_embeddings that differs from the reference raises
            ``ValueError``. ``sqrt`` and ``layers`` stay yours.
        batch_size, padding_side, device, progress: :class:`~..runner.RunOptions` (8 samples per forward
            pass, results agree across batch sizes to rounding; right padding; the input embedding's device;
            progress bars on).
        prompt: as :func:`~..probes.encoding.encode_probe` (default: the chat template).
        options / run: the options as dataclasses; a keyword that is passed overrides its field
            (``mir(m, p, outliers="drop")`` is ``mir(m, p, options=MIROptions(outliers="drop"))``).
        accelerator: an ``accelerate.Accelerator`` of several processes (``accelerate launch``), each holding
            the model: the probe's batches are dealt out to the processes (batch i to process
            i % num_processes, the batches one process would form), each captures its own, and the
            statistics are merged exactly on the main process, which computes the distances (streaming:
            Chan-merged moments; otherwise the features, gathered in probe order). Every process must call
            ``mir`` with the same arguments; the result equals one process's to float64 round-off.

    Returns:
        :class:`MIRResult` (``None`` on the other processes of an ``accelerator``); ``settings``
        also records ``final_norm``, ``batch_size``, the probe, the model and the layer numbering.
        JSON: ``result.to_dict()``.

    Raises:
        ValueError: an empty probe or fewer than 2 pairs, an image that does not decode (naming the file), a
            passage over the encoding limit (naming it), a prompt without vision tokens, fewer than 2 tokens of a
            modality, non-finite features (naming the layer).
    """
    view = ModelView.of(model)
    options = merge_options(
        MIROptions, options, final_norm=final_norm, layers=layers, include_embeddings=include_embeddings,
        outliers=outliers, sqrt=sqrt, log_base=log_base, outlier_threshold=outlier_threshold,
        outlier_stats=outlier_stats, text_scale=text_scale, text_tokens=text_tokens, preset=preset,
        streaming=streaming, stats_device=stats_device, max_feature_gb=max_feature_gb,
    )  # fmt: skip
    run = merge_options(RunOptions, run, batch_size=batch_size, padding_side=padding_side, device=device,
                        progress=progress)  # fmt: skip
    prepared = mir_run(view, processor, probe, num_samples=num_samples, seed=seed, prompt=prompt, options=options,
                       run=run)  # fmt: skip
    return prepared.run(view, processor, run, accelerator)


def _apply_preset(options: MIROptions, prompt: str | None, processor: Any, probe: Any) -> tuple[str, str | None]:
    """(text_tokens, prompt) after ``options.preset``; ``ValueError`` for a preset value the caller overrode."""
    preset, text_tokens = options.preset, options.text_tokens
    if preset is None:
        text_tokens = "passage" if text_tokens is None else text_tokens
        if text_tokens not in TEXT_TOKENS:
            raise ValueError(f"text_tokens must be one of {', '.join(TEXT_TOKENS)}, got {text_tokens!r}")
        return text_tokens, prompt
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    given = {k: getattr(options, k) for k in _REFERENCE_FIXED}
    if given["outlier_threshold"] is None:  # the default: 3 standard deviations, as the reference
        given["outlier_threshold"] = 3.0
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
