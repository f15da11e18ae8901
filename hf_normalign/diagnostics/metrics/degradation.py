"""Visual representation degradation across LLM depth (the PRe paper's diagnostics, arXiv 2603.20808).

Per hidden state l (0 = LLM input, k = output of decoder layer k), on the vision tokens:

- **effective dimension** of the mean-pooled vision features (one vector per image): the
  participation ratio PR = (sum_i lambda_i)^2 / sum_i lambda_i^2 of the eigenvalues of their
  covariance, :func:`participation_ratio`. PR is 1 when one direction holds all the variance and d
  when all d directions hold equal variance; it is at most min(images - 1, d).
- **mean off-diagonal correlation** of the pooled features: the Pearson correlation between every
  two feature dimensions across images (``axis="features"``, default) or between every two images
  across dimensions (``axis="samples"``), averaged off the diagonal, both as the mean |r|
  (:func:`mean_abs_offdiag_correlation`) and signed (:func:`mean_offdiag_correlation`); the paper's
  text does not say which it plots. High values mean redundant, collapsed features.
- **patch contrast ratio** when patch labels are given, :func:`contrast_ratio`: cohesion = mean cosine
  of two vision tokens of the same object in the same image, coupling = mean cosine of two tokens
  of different objects in the same image; ``ratio`` = cohesion / coupling, the paper's definition
  (undefined when coupling is 0 and meaningless when it is negative: read cohesion and coupling then).
  ``ratio_shifted`` = (1 + cohesion) / (1 + coupling), the ratio of the mean shifted similarities
  (1 + cos) / 2 in [0, 1], is ours: defined for any cosines, 1 means no contrast. The two can move in
  opposite directions (0.5 / 0.2 -> 0.9 / 0.5: the paper's ratio falls, the shifted one rises), so
  compare with the paper only through ``ratio``.
- **linear-probe accuracy** when image labels are given, :func:`linear_probe_accuracy`: ridge
  regression on one-hot labels (closed form, standardised features), k-fold cross-validated.

The default probe (:func:`shapes_probe`) draws images of two to four shapes of one kind
(rectangles, ellipses or triangles: the image label) on a textured background, with a pixel map of
which object each pixel belongs to (the patch labels). The built-in ``default_probe`` supplies image
labels (document / chart / scene) through its sample names, but no patch labels.

The measures are in :mod:`..maths.degradation`, the shapes probe in :mod:`..probes.shapes`; this module holds
the result, the options and the accumulator that :func:`visual_degradation` runs with :func:`~..runner.run_probe`.

Example:
    >>> import torch
    >>> r = degradation_from_features([torch.randn(12, 4)], torch.arange(12) // 3)
    >>> r.layers, r.num_images
    ([0], 4)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ...model_view import ModelView
from ..engine import CaptureBatch
from ..maths.degradation import (
    DegradationOptions,
    contrast_from_sums,
    contrast_sums,
    linear_probe_accuracy,
    mean_abs_offdiag_correlation,
    mean_offdiag_correlation,
    participation_ratio,
)
from ..maths.features import as_features
from ..options import UNSET, merge_options
from ..probes.encoding import EncodedSample, prepare_probe
from ..probes.shapes import resolve_labelled
from ..results import Column, Result, Table, first_last
from ..runner import Accumulator, CaptureRequest, MetricRun, RunOptions
from .token_grid import batch_patch_labels, token_grid

__all__ = [
    "DegradationAccumulator",
    "DegradationOptions",
    "DegradationResult",
    "DegradationRun",
    "degradation_from_features",
    "degradation_run",
    "visual_degradation",
]


@dataclass
class DegradationResult(Result):
    """Per-layer degradation metrics of the vision tokens.

    Attributes:
        layers: hidden-state numbers (0 = LLM input, k = output of decoder layer k).
        effective_dim: participation ratio of the mean-pooled vision features (one row per image).
        offdiag_corr: mean |r| off the diagonal of their correlation matrix (``settings["corr_axis"]``).
        offdiag_corr_signed: the signed mean r off the diagonal.
        cohesion / coupling / contrast_ratio: patch contrast, ratio = cohesion / coupling as the paper
            (None without patch labels).
        contrast_ratio_shifted: (1 + cohesion) / (1 + coupling) (None without patch labels).
        probe_accuracy: cross-validated linear-probe accuracy (None without image labels).
        probe_chance: share of the most frequent class (what a constant guess scores).
        num_images, num_classes, class_names: the probe behind the numbers.
        num_labelled_tokens: vision tokens with an object label (0 without patch labels).
        settings: how it was computed.

    Example:
        >>> import torch
        >>> feats = [torch.randn(40, 6)]
        >>> r = degradation_from_features(feats, torch.arange(40) // 4, image_labels=[i % 2 for i in range(10)],
        ...                               folds=2)
        >>> r.layers, r.contrast_ratio, 0 <= r.probe_accuracy[0] <= 1
        ([0], None, True)
    """

    layers: list[int]
    effective_dim: list[float]
    offdiag_corr: list[float]
    cohesion: list[float] | None
    coupling: list[float] | None
    contrast_ratio: list[float] | None
    probe_accuracy: list[float] | None
    probe_chance: float | None
    num_images: int
    num_classes: int | None
    class_names: list[str] | None
    num_labelled_tokens: int
    settings: dict[str, Any] = field(default_factory=dict)
    offdiag_corr_signed: list[float] = field(default_factory=list)
    contrast_ratio_shifted: list[float] | None = None

    TABLES = (
        Table(
            "layers",
            "layer",
            (
                Column("effective_dim", "effective dim", ".3f"),
                Column("offdiag_corr", "|corr|", ".4f"),
                Column("offdiag_corr_signed", "corr (signed)", ".4f"),
                Column("cohesion", "cohesion", ".4f"),
                Column("coupling", "coupling", ".4f"),
                Column("contrast_ratio", "contrast cohesion/coupling", ".4f"),
                Column("contrast_ratio_shifted", "contrast (1+coh)/(1+coup)", ".4f"),
                Column("probe_accuracy", "probe accuracy", ".3f"),
            ),
        ),
    )

    def __str__(self) -> str:
        chance = f", probe chance {self.probe_chance:.3f}" if self.probe_chance is not None else ""
        return f"DegradationResult ({self.num_images} images{chance})\n{self.format_table()}"

    def summary(self) -> dict[str, float | None]:
        """Headline numbers for the report: effective dimension, contrast ratio and probe accuracy at the LLM
        input and the last layer, and the probe's chance level."""
        out: dict[str, float | None] = {}
        out["effective_dim_input"], out["effective_dim_last"] = first_last(self.effective_dim, self.layers)
        out["contrast_ratio_input"], out["contrast_ratio_last"] = first_last(self.contrast_ratio, self.layers)
        out["probe_accuracy_input"], out["probe_accuracy_last"] = first_last(self.probe_accuracy, self.layers)
        out["probe_chance"] = self.probe_chance
        return out


class DegradationAccumulator(Accumulator):
    """Mean-pooled vision features per image and contrast sums per layer, fed batch by batch.

    ``label_maps`` (one [H, W] object map per probe sample, -1 = background) turn on the contrast ratio: each
    vision token gets the label of its cell of the image's token grid (``token_grid``, default
    :func:`token_grid` of the model). ``image_labels`` (a class per probe sample) turn on the linear probe.
    """

    def __init__(
        self,
        layers: Sequence[int],
        options: DegradationOptions | None = None,
        *,
        final_norm: bool = False,
        image_labels: Sequence[int] | None = None,
        class_names: list[str] | None = None,
        label_maps: Sequence[Any] | None = None,
        token_grid: Callable[[int], tuple[int, int, int] | None] | None = None,
        ignore_label: int = -1,
    ) -> None:
        self.layers = list(layers)
        self.options = options or DegradationOptions()
        self.request = CaptureRequest(tuple(self.layers), final_norm=final_norm)
        self.image_labels, self.class_names = image_labels, class_names
        self.label_maps, self.with_contrast = label_maps, label_maps is not None
        self.ignore_label = ignore_label
        self._token_grid = token_grid
        self._grid_of: Callable[[int], tuple[int, int, int] | None] | None = None
        self.pooled: dict[int, list[torch.Tensor]] = {k: [] for k in self.layers}
        self.sums: dict[int, list[float]] = {k: [0.0] * 4 for k in self.layers}
        self.images: list[torch.Tensor] = []
        self.labelled = 0

    @contextlib.contextmanager
    def attach(self, view: ModelView, samples: Sequence[Any]) -> Iterator[None]:
        self._grid_of = self._token_grid or functools.partial(token_grid, view)
        self._model_type = getattr(view.config, "model_type", "this model")
        try:
            yield
        finally:
            self._grid_of = None  # no model reference outside the run

    def __getstate__(self) -> dict[str, Any]:
        # Sent between processes after the run: a token_grid callable (often a lambda) stays behind.
        return {**self.__dict__, "_token_grid": None, "_grid_of": None}

    def update(self, batch: CaptureBatch) -> None:
        patch = None
        if self.with_contrast:
            patch = batch_patch_labels(
                batch.vision_sample, batch.vision_patch, self.label_maps, self._grid_of, self.options.min_coverage
            )
            if patch is None:
                self.with_contrast = False
                warnings.warn(
                    f"the layout of the vision tokens of {self._model_type} is unknown (pass token_grid=...): "
                    "the contrast ratio is skipped",
                    stacklevel=2,
                )
        self.add(batch.vision, batch.vision_sample, patch)

    def add(self, feats: dict[int, Any], groups: torch.Tensor, patch_labels: torch.Tensor | None) -> None:
        """Add vision features (layer -> [n, d]) with each row's image id ``groups`` [n] and object label."""
        groups = groups.reshape(-1).cpu()
        ids, inverse = groups.unique(sorted=True, return_inverse=True)
        counts = torch.bincount(inverse, minlength=ids.shape[0]).double()
        self.images.append(ids)
        if patch_labels is not None:
            self.labelled += int((patch_labels != self.ignore_label).sum())
        for k in self.layers:
            x = as_features(feats[k], f"vision features of layer {k}")
            inv = inverse.to(x.device)
            pooled = torch.zeros(ids.shape[0], x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inv, x)
            self.pooled[k].append((pooled / counts.to(x.device)[:, None]).cpu())
            if patch_labels is not None:
                s = contrast_sums(x, patch_labels.to(x.device), groups.to(x.device), self.ignore_label)
                self.sums[k] = [a + b for a, b in zip(self.sums[k], s, strict=True)]

    def merge(self, other: DegradationAccumulator) -> None:
        self.images += other.images
        self.labelled += other.labelled
        self.with_contrast = self.with_contrast and other.with_contrast
        for k in self.layers:
            self.pooled[k] += other.pooled[k]
            self.sums[k] = [a + b for a, b in zip(self.sums[k], other.sums[k], strict=True)]

    def result(self, *, settings: dict[str, Any] | None = None) -> DegradationResult:
        images = torch.cat(self.images) if self.images else torch.empty(0, dtype=torch.long)
        n = images.shape[0]
        if n < 2:
            raise ValueError(f"the degradation metrics need at least 2 images with vision tokens, got {n}")
        order = images.argsort()  # probe order, whatever the batches were
        labels = None
        if self.image_labels is not None:
            labels = np.asarray([self.image_labels[i] for i in images[order].tolist()])
        opts = self.options
        eff, corr, signed, coh, cop, ratio, shifted, acc = [], [], [], [], [], [], [], []
        for k in self.layers:
            x = torch.cat(self.pooled[k])[order]
            eff.append(participation_ratio(x))
            corr.append(mean_abs_offdiag_correlation(x, axis=opts.corr_axis))
            signed.append(mean_offdiag_correlation(x, axis=opts.corr_axis))
            if self.with_contrast:
                c = contrast_from_sums(self.sums[k])
                coh.append(c.cohesion)
                cop.append(c.coupling)
                ratio.append(c.ratio)
                shifted.append(c.ratio_shifted)
            if labels is not None:
                acc.append(linear_probe_accuracy(x, labels, folds=opts.folds, seed=opts.seed, ridge=opts.ridge))
        contrast = self.with_contrast
        extra = dict(settings or {})
        if not contrast and "min_coverage" in extra:
            extra["min_coverage"] = None
        return DegradationResult(
            layers=self.layers,
            effective_dim=eff,
            offdiag_corr=corr,
            cohesion=coh if contrast else None,
            coupling=cop if contrast else None,
            contrast_ratio=ratio if contrast else None,
            probe_accuracy=acc if labels is not None else None,
            probe_chance=None
            if labels is None
            else float(np.unique(labels, return_counts=True)[1].max() / labels.size),
            num_images=n,
            num_classes=int(np.unique(labels).size) if labels is not None else None,
            class_names=self.class_names,
            num_labelled_tokens=self.labelled,
            settings=opts.settings() | extra,
            offdiag_corr_signed=signed,
            contrast_ratio_shifted=shifted if contrast else None,
        )


def degradation_from_features(
    vision_layers: Sequence[Any],
    image_ids: Any,
    *,
    patch_labels: Any = None,
    image_labels: Sequence[int] | None = None,
    class_names: list[str] | None = None,
    layers: Sequence[int] | None = None,
    folds: int = 5,
    ridge: float = 0.1,
    corr_axis: str = "features",
    ignore_label: int = -1,
    seed: int = 0,
) -> DegradationResult:
    """Degradation metrics from vision-token features: ``vision_layers[j]`` [n_tokens, d] per layer.

    ``image_ids`` [n_tokens] says which image each token belongs to (0..num_images-1; pooling and
    contrast pairs follow it); ``patch_labels`` [n_tokens] gives object labels (-1 = none) for the
    contrast ratio; ``image_labels[i]`` is the class of image i for the linear probe. Either may be
    None, which skips that metric.

    Example:
        >>> import torch
        >>> r = degradation_from_features([torch.randn(12, 4)], torch.arange(12) // 3,
        ...                               patch_labels=torch.tensor([0, 0, 1] * 4))
        >>> r.contrast_ratio is not None, r.probe_accuracy
        (True, None)
    """
    if len(vision_layers) == 0:
        raise ValueError("no layers given")
    numbers = list(range(len(vision_layers))) if layers is None else [int(i) for i in layers]
    if len(numbers) != len(vision_layers):
        raise ValueError(f"layers must number the {len(vision_layers)} entries, got {numbers}")
    ids = torch.as_tensor(np.asarray(image_ids)).long().reshape(-1)
    labels = None if patch_labels is None else torch.as_tensor(np.asarray(patch_labels)).long().reshape(-1)
    acc = DegradationAccumulator(
        numbers,
        DegradationOptions(folds, ridge, corr_axis, seed),
        image_labels=image_labels,
        class_names=class_names,
        ignore_label=ignore_label,
    )
    acc.with_contrast = labels is not None
    acc.add(dict(zip(numbers, vision_layers, strict=True)), ids, labels)
    return acc.result()


class DegradationRun(MetricRun):
    """:func:`visual_degradation` prepared for one model and probe (:class:`~..runner.MetricRun`)."""

    name = "degradation"

    def __init__(self, samples: list[EncodedSample], layers: list[int], options: DegradationOptions, data: Any,
                 settings: dict) -> None:  # fmt: skip
        self.samples, self.layers, self.options, self.data, self.settings = samples, layers, options, data, settings

    def accumulator(self) -> DegradationAccumulator:
        # The grid callable (often a lambda) is kept out of the options the accumulator carries between processes.
        return DegradationAccumulator(
            self.layers,
            dataclasses.replace(self.options, token_grid=None),
            final_norm=self.options.final_norm,
            image_labels=self.data.image_labels,
            class_names=self.data.class_names,
            label_maps=self.data.label_maps,
            token_grid=self.options.token_grid,
        )

    def finish(self, merged: DegradationAccumulator) -> DegradationResult:
        return merged.result(settings=self.settings)


def degradation_run(
    model: nn.Module | ModelView,
    processor: Any,
    probe: Any = None,
    *,
    image_labels: Sequence[int] | None = None,
    label_maps: Sequence[Any] | None = None,
    num_samples: int | None = 60,
    seed: int = 0,
    prompt: str | None = None,
    options: DegradationOptions | None = None,
    run: RunOptions | None = None,
    samples: list[EncodedSample] | None = None,
) -> DegradationRun:
    """The degradation metrics prepared, not run (arguments: :func:`visual_degradation`); give it to
    :func:`~..runner.run_metrics` to share a probe pass with other metrics over the same samples.
    ``samples``: the probe already encoded (``prepare_probe(processor, probe, num_samples=..., seed=...,
    prompt=...)``), to share one encoding (and so one pass) between metrics.
    """
    view, run = ModelView.of(model), run or RunOptions()
    options = options or DegradationOptions(seed=seed)
    selected = view.resolve_layers(options.layers, include_embeddings=options.layers is None)
    data = resolve_labelled(probe, image_labels, label_maps, num_samples, seed)
    if samples is None:
        samples = prepare_probe(processor, data.samples, seed=seed, prompt=prompt, progress=run.progress)
    settings = {
        "final_norm": options.final_norm,
        "probe": data.name,
        "batch_size": run.batch_size,
        "min_coverage": options.min_coverage,
    }
    return DegradationRun(samples, selected, options, data, settings)


def visual_degradation(
    model: nn.Module,
    processor: Any,
    probe: Any = None,
    *,
    image_labels: Sequence[int] | None = None,
    label_maps: Sequence[Any] | None = None,
    num_samples: int | None = 60,
    seed: int = 0,
    layers: Iterable[int] | None = UNSET,
    batch_size: int = UNSET,
    final_norm: bool = UNSET,
    folds: int = UNSET,
    ridge: float = UNSET,
    corr_axis: str = UNSET,
    min_coverage: float = UNSET,
    token_grid: Callable[[int], tuple[int, int, int] | None] | None = UNSET,
    device: str | torch.device | None = UNSET,
    prompt: str | None = None,
    progress: bool = UNSET,
    accelerator: Any = None,
    options: DegradationOptions | None = None,
    run: RunOptions | None = None,
) -> DegradationResult | None:
    """Visual degradation of ``model`` across depth (default probe: :func:`shapes_probe`, labelled).

    Args:
        model: a supported ``...ForConditionalGeneration`` model.
        processor: its processor.
        probe: None (the shapes probe), a :class:`LabelledProbe`, a :class:`~..probes.probe.Probe` (the built-in
            ``default_probe`` brings its document / chart / scene classes), pairs or encoded samples.
        image_labels / label_maps: labels for a plain probe: a class per pair, and an [H, W] map of
            object ids per pair (-1 = background) over the image as the processor sees it (square images
            are safest: a centre crop would shift the map).
        num_samples, seed: pairs used (a seeded subset, labels kept aligned); ``seed`` also seeds the linear
            probe unless ``options`` is given (then ``options.seed`` does).
        layers, final_norm, folds, ridge, corr_axis, min_coverage, token_grid: :class:`DegradationOptions`
            (defaults there). layers: hidden-state numbers 0..K (default all, 0 = the LLM input).
            final_norm: False (default) takes layer K before the final norm, like the other layers.
            folds, ridge: linear probe (:func:`linear_probe_accuracy`). corr_axis: see
            :func:`mean_abs_offdiag_correlation`. min_coverage: share of a token's cell an object must cover
            to label the token. token_grid: maps the number of vision tokens of an image to (first token,
            rows, cols) of the row-major token grid covering the whole image; default :func:`token_grid`
            (square grids, and the overview tile of a spec with ``vision_grid="overview_tile"``). Without a
            grid the contrast ratio is skipped (warning).
        batch_size, device, progress: :class:`~..runner.RunOptions` (8, the input embedding's device, on).
        prompt: passed to :func:`~..probes.encoding.prepare_probe`.
        accelerator: an ``accelerate.Accelerator`` of several processes: the probe is split across them and
            the pooled features merged on the main process (:mod:`..runner`); the others return None.
        options / run: the options as dataclasses; a keyword that is passed overrides its field.

    Example:
        >>> from hf_normalign.testing import tiny_model, tiny_processor
        >>> r = visual_degradation(tiny_model("llava"), tiny_processor("llava"), num_samples=12, folds=3,
        ...                        progress=False)
        >>> r.layers, r.num_classes
        ([0, 1, 2], 3)
    """
    view = ModelView.of(model)
    options = merge_options(
        DegradationOptions, options if options is not None else DegradationOptions(seed=seed),
        layers=layers, final_norm=final_norm, folds=folds, ridge=ridge, corr_axis=corr_axis,
        min_coverage=min_coverage, token_grid=token_grid,
    )  # fmt: skip
    run = merge_options(RunOptions, run, batch_size=batch_size, device=device, progress=progress)
    prepared = degradation_run(view, processor, probe, image_labels=image_labels, label_maps=label_maps,
                               num_samples=num_samples, seed=seed, prompt=prompt, options=options, run=run)  # fmt: skip
    return prepared.run(view, processor, run, accelerator)
