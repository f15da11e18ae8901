"""Key-space modality gap (arXiv 2510.26721): do vision and text tokens live in different key spaces?

At each selected decoder layer the attention keys are taken in one of three key spaces (``keys``), all
heads concatenated (with GQA that is ``num_key_value_heads * head_dim`` values):

- ``"k_proj"`` (default): the output of ``self_attn.k_proj``, before any per-head ``k_norm`` and RoPE;
- ``"post_norm"``: after the attention's per-head ``k_norm`` (Qwen3, Gemma3); for a model without one
  this equals ``"k_proj"``, and ``settings["keys"]`` says so;
- ``"post_rope"``: after ``k_norm`` and the rotary embedding, as attention compares them: the model's
  own ``apply_rotary_pos_emb`` (from its transformers module) with the position embeddings the
  attention module receives (recorded by a forward pre-hook).

Vision keys and text-passage keys are compared with

- MMD^2 with a Gaussian RBF kernel k(a, b) = exp(-||a - b||^2 / (2 h^2)), :func:`mmd2_rbf`;
- the Jensen-Shannon divergence of histograms of a shared PCA projection, :func:`jsd_pca`;
- the same two numbers between random halves of each modality: the intra-modal baseline (what
  "no gap" looks like at this sample size, kernel and binning).

The paper does not state its kernel bandwidth, estimator, sample size, JSD estimator or layers; the
choices made here (all parameters) are:

- **bandwidth**: median heuristic, h = median of the pairwise Euclidean distances between distinct
  points of the pooled (subsampled) vision + text keys of that layer (mean distance if the median is
  0, 1.0 if all points coincide). The intra-modal baselines reuse the cross-modal h of their layer, so
  the three numbers of a layer come from one kernel and are comparable.
- **estimator**: the unbiased U-statistic (diagonal terms left out), so identical distributions give
  about 0 and small negative values are possible; ``unbiased=False`` gives the biased V-statistic.
- **sample cap**: ``max_samples`` (default 2000) keys per modality and layer, a uniform random subset
  without replacement, seeded; the same tokens are used at every layer.
- **JSD**: PCA fitted on the pooled subsampled keys with the two modalities weighted equally (so the
  larger set does not choose the axes), ``pca_dims`` components (default 2), each split into ``bins``
  equal-width bins between the ``clip_quantile`` and 1 - ``clip_quantile`` quantiles of the pooled
  projections (default 0.01; outside points go to the edge bins), one joint histogram per modality,
  JSD in ``jsd_base`` (default 2: bits, in [0, 1]). JSD = scipy's ``jensenshannon(p, q, base)``
  squared (scipy returns the distance, the square root). The plug-in JSD of sparse histograms is
  biased upwards (roughly cells / (4 n ln 2) for n points per set), so by default ``bins`` is chosen
  per layer for about 10 points per cell in a random half of the smaller modality,
  bins = clip(floor((n_half / 10)^(1 / pca_dims)), 2, 64), and the same bins serve the cross-modal
  JSD and both baselines, which show the remaining bias.

The scatter layers also get a 2-D t-SNE of the same points with ``tsne=True`` (:func:`tsne_2d`; needs
scikit-learn: ``pip install "hf-normalign[tsne]"``). t-SNE keeps neighbourhoods, not distances: two
separate clouds mean the keys separate, but cloud sizes and the space between them mean nothing.

The measures are in :mod:`..maths.keyspace`; this module holds the result, the options, the per-layer
computation and the accumulator that :func:`key_space_gap` runs over a probe with :func:`~..runner.run_probe`.

Example:
    >>> from hf_normalign.testing import tiny_model, tiny_processor
    >>> r = key_space_gap(tiny_model("llava"), tiny_processor("llava"), num_samples=4, progress=False)
    >>> r.layers, r.mmd2[0] > r.mmd2_text_halves[0]
    ([1, 2], True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...model_view import ModelView
from ..engine import CaptureBatch
from ..maths.features import as_features
from ..maths.keyspace import KeySpaceOptions, layer_gap
from ..maths.mmd import subsample
from ..maths.reservoir import Reservoir
from ..options import UNSET, merge_options
from ..probes.encoding import EncodedSample, prepare_probe, probe_description
from ..results import Column, Result, Table, mean
from ..runner import Accumulator, CaptureRequest, MetricRun, RunOptions
from .key_transform import KeyTransform

__all__ = [
    "KEY_SPACES",
    "KeySpaceAccumulator",
    "KeySpaceOptions",
    "KeySpaceResult",
    "KeySpaceRun",
    "key_space_from_features",
    "key_space_gap",
    "key_space_run",
    "layer_gap",
]

KEY_SPACES: tuple[str, ...] = ("k_proj", "post_norm", "post_rope")


@dataclass
class KeySpaceResult(Result):
    """Key-space gap per layer.

    Attributes:
        layers: decoder layers (1-based; keys of layer k come from ``layers[k - 1].self_attn``, in the key
            space named in ``settings``).
        mmd2: MMD^2(vision keys, text keys), with the estimator chosen by ``unbiased``.
        mmd2_unbiased / mmd2_biased: both estimators of that MMD^2 (U- and V-statistic).
        mmd: MMD = sqrt(biased MMD^2), the distance itself (the paper quotes "MMD"; the V-statistic is
            never negative, so its root always exists).
        mmd2_vision_halves / mmd2_text_halves: MMD^2 between two random halves of one modality
            (intra-modal baseline, same bandwidth as ``mmd2``).
        jsd, jsd_vision_halves, jsd_text_halves: the same for the PCA-histogram JSD.
        bandwidth: the RBF bandwidth h used at each layer.
        jsd_bins: histogram bins per PCA axis used at each layer.
        num_vision_keys / num_text_keys: keys seen per layer (before the cap).
        num_vision_used / num_text_used: keys used per layer (after the cap).
        scatter: layer (as a string, for JSON) -> {"vision": [[pc1, pc2], ...], "text": [...],
            "variance": [var1, var2]} on the shared PCA axes of that layer, for the 2-D plot; with
            ``tsne=True`` also "tsne": {"vision": [[x, y], ...], "text": [...]}, a t-SNE of the same points.
        num_samples: probe pairs behind the keys (None when unknown).
        settings: every choice above (kernel, bandwidth rule, estimator, caps, PCA / histogram / base,
            which keys).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> r = key_space_from_features([torch.randn(40, 4, generator=g) + 1], [torch.randn(30, 4, generator=g)])
        >>> r.layers, r.mmd2[0] > r.mmd2_text_halves[0]
        ([0], True)
    """

    layers: list[int]
    mmd2: list[float]
    mmd2_vision_halves: list[float]
    mmd2_text_halves: list[float]
    jsd: list[float]
    jsd_vision_halves: list[float]
    jsd_text_halves: list[float]
    bandwidth: list[float]
    jsd_bins: list[int]
    num_vision_keys: list[int]
    num_text_keys: list[int]
    num_vision_used: list[int]
    num_text_used: list[int]
    scatter: dict[str, dict[str, list]] = field(default_factory=dict)
    num_samples: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    mmd: list[float] = field(default_factory=list)
    mmd2_unbiased: list[float] = field(default_factory=list)
    mmd2_biased: list[float] = field(default_factory=list)

    TABLES = (
        Table(
            "layers",
            "layer",
            (
                Column("mmd2", "MMD²", ".4f"),
                Column("mmd", "MMD", ".4f"),
                Column("mmd2_unbiased", "MMD² unbiased", ".4f"),
                Column("mmd2_biased", "MMD² biased", ".4f"),
                Column("mmd2_vision_halves", "MMD² V|V", ".4f"),
                Column("mmd2_text_halves", "MMD² T|T", ".4f"),
                Column("jsd", "JSD", ".4f"),
                Column("jsd_vision_halves", "JSD V|V", ".4f"),
                Column("jsd_text_halves", "JSD T|T", ".4f"),
                Column("bandwidth", "bandwidth h", ".4g"),
                Column("jsd_bins", "JSD bins/axis", "d"),
            ),
        ),
    )

    def __str__(self) -> str:
        return f"KeySpaceResult ({self.num_samples} samples; V|V, T|T = random halves)\n{self.format_table()}"

    def summary(self) -> dict[str, float | None]:
        """Headline numbers for the report: the mean MMD^2 across layers, its intra-modal baseline (mean of the
        two halves' MMD^2) and the mean JSD."""
        intra = (0.5 * (a + b) for a, b in zip(self.mmd2_vision_halves, self.mmd2_text_halves, strict=True))
        return {"key_mmd2_mean": mean(self.mmd2), "key_mmd2_intra_mean": mean(intra), "key_jsd_mean": mean(self.jsd)}


def _result(
    per_layer: list[dict[str, Any]],
    layers: list[int],
    seen: list[tuple[int, int]],
    used: list[tuple[int, int]],
    num_samples: int | None,
    settings: dict[str, Any],
) -> KeySpaceResult:
    """The result from the per-layer numbers of :func:`layer_gap`."""
    keys = (
        "mmd2",
        "mmd",
        "mmd2_unbiased",
        "mmd2_biased",
        "mmd2_vision_halves",
        "mmd2_text_halves",
        "jsd",
        "jsd_vision_halves",
        "jsd_text_halves",
        "bandwidth",
        "jsd_bins",
    )
    return KeySpaceResult(
        layers=list(layers),
        **{k: [r[k] for r in per_layer] for k in keys},
        num_vision_keys=[s[0] for s in seen],
        num_text_keys=[s[1] for s in seen],
        num_vision_used=[u[0] for u in used],
        num_text_used=[u[1] for u in used],
        scatter={str(layer): r["scatter"] for layer, r in zip(layers, per_layer, strict=True) if "scatter" in r},
        num_samples=num_samples,
        settings=settings,
    )


def key_space_from_features(
    vision_keys: Sequence[Any],
    text_keys: Sequence[Any],
    *,
    layers: Sequence[int] | None = None,
    bandwidth: float | None = None,
    unbiased: bool = True,
    max_samples: int | None = 2000,
    pca_dims: int = 2,
    bins: int | None = None,
    jsd_base: float = 2.0,
    clip_quantile: float = 0.01,
    scatter_layers: Iterable[int] | None = None,
    scatter_points: int = 300,
    seed: int = 0,
    num_samples: int | None = None,
    tsne: bool = False,
) -> KeySpaceResult:
    """Key-space gap from stacked keys: ``vision_keys[j]`` [n_v, d] and ``text_keys[j]`` [n_t, d].

    ``layers`` numbers the entries (default 0, 1, ...). Rows are capped at ``max_samples`` per
    modality (seeded; the same row positions at every layer when the counts agree). ``scatter_layers``
    (default: first, middle and last) get 2-D PCA points for the plot, ``scatter_points`` per modality,
    and with ``tsne=True`` a t-SNE of the same points (:func:`tsne_2d`, needs scikit-learn).
    Other arguments: module docstring. ValueError when a modality has fewer than 4 keys at a layer.

    Example:
        >>> import torch
        >>> r = key_space_from_features([torch.randn(50, 4)], [torch.randn(50, 4)], layers=[3], bins=5)
        >>> r.layers, sorted(r.scatter)
        ([3], ['3'])
    """
    if len(vision_keys) != len(text_keys):
        raise ValueError(f"got {len(vision_keys)} vision layers but {len(text_keys)} text layers")
    if len(vision_keys) == 0:
        raise ValueError("no layers given")
    numbers = list(range(len(vision_keys))) if layers is None else [int(i) for i in layers]
    if len(numbers) != len(vision_keys):
        raise ValueError(f"layers must number the {len(vision_keys)} entries, got {numbers}")
    opts = KeySpaceOptions(
        bandwidth, unbiased, max_samples, pca_dims, bins, jsd_base, clip_quantile,
        None if scatter_layers is None else tuple(scatter_layers), scatter_points, seed, tsne,
    )  # fmt: skip
    scatter = opts.scatter_for(numbers)
    per_layer, seen, used = [], [], []
    for layer, v_raw, t_raw in zip(numbers, vision_keys, text_keys, strict=True):
        v = as_features(v_raw, f"vision keys of layer {layer}", min_rows=0)
        t = as_features(t_raw, f"text keys of layer {layer}", min_rows=0).to(v.device)
        vs, ts = subsample(v, max_samples, seed), subsample(t, max_samples, seed + 1)
        per_layer.append(layer_gap(vs, ts, layer, opts, layer in scatter))
        seen.append((v.shape[0], t.shape[0]))
        used.append((vs.shape[0], ts.shape[0]))
    return _result(per_layer, numbers, seen, used, num_samples, opts.settings())


class KeySpaceAccumulator(Accumulator):
    """Keys of the selected layers, a seeded uniform sample of at most ``options.max_samples`` per modality
    (:class:`~..maths.reservoir.Reservoir`), in the key space ``keys``.

    Each row's priority in the sample is fixed by its place in the probe (sample, position), so the kept
    keys do not depend on how the probe is batched or split across processes.
    """

    def __init__(self, layers: Sequence[int], options: KeySpaceOptions, *, keys: str = "k_proj") -> None:
        if keys not in KEY_SPACES:
            raise ValueError(f"keys must be one of {', '.join(KEY_SPACES)}; got {keys!r}")
        self.layers = sorted(int(k) for k in layers)
        if 0 in self.layers:
            raise ValueError("layer 0 is the LLM input and has no attention keys; choose decoder layers 1..K")
        self.options, self.keys = options, keys
        self.request = CaptureRequest(tuple(self.layers), capture_keys=True)
        self.vision = Reservoir(options.max_samples, options.seed)
        self.text = Reservoir(options.max_samples, options.seed + 1)
        self.description = "self_attn.k_proj output (before any k_norm and RoPE), all KV heads concatenated"
        self._offsets: dict[str, torch.Tensor] = {}
        self._priority: dict[str, torch.Tensor] = {}
        self._transform: KeyTransform | None = None

    @contextlib.contextmanager
    def attach(self, view: ModelView, samples: Sequence[EncodedSample]) -> Iterator[None]:
        if not self._offsets:  # priorities of every row of the probe, in probe order
            ids = torch.tensor(view.vision_token_ids)
            counts = {
                "vision": [int((torch.isin(s.input_ids, ids) & _attended(s)).sum()) for s in samples],
                "text": [s.num_text_tokens for s in samples],
            }
            for i, (kind, n) in enumerate(counts.items()):
                self._offsets[kind] = torch.tensor([0, *n]).cumsum(0)[:-1]
                self._priority[kind] = torch.rand(
                    sum(n), generator=torch.Generator().manual_seed(self.options.seed + i)
                )
        if self.keys == "k_proj":
            yield
            return
        self._transform = KeyTransform(view, self.layers, samples, self.keys)
        self.description = self._transform.describe()
        try:
            with self._transform.hooks():
                yield
        finally:
            self._transform = None  # no model reference outside the run

    def update(self, batch: CaptureBatch) -> None:
        keys = (batch.vision_keys, batch.text_keys) if self._transform is None else self._transform(batch)
        for kind, reservoir, feats, sample, within in (
            ("vision", self.vision, keys[0], batch.vision_sample, batch.vision_patch),
            ("text", self.text, keys[1], batch.text_sample, batch.text_token),
        ):
            ids = self._offsets[kind][sample] + within
            reservoir.update(feats, ids=ids, priority=self._priority[kind][ids])

    def merge(self, other: KeySpaceAccumulator) -> None:
        self.vision.merge(other.vision)
        self.text.merge(other.text)

    def result(self, *, num_samples: int | None = None, settings: dict[str, Any] | None = None) -> KeySpaceResult:
        if self.text.seen == 0:
            raise ValueError("no text-passage tokens in the probe: the key-space gap needs both modalities")
        scatter = self.options.scatter_for(self.layers)
        v, t = self.vision.rows, self.text.rows
        per_layer = [
            layer_gap(v[k].double(), t[k].double().to(v[k].device), k, self.options, k in scatter) for k in self.layers
        ]
        used = [(v[k].shape[0], t[k].shape[0]) for k in self.layers]
        seen = [(self.vision.seen, self.text.seen)] * len(self.layers)
        settings = self.options.settings() | {"key_space": self.keys, "keys": self.description} | (settings or {})
        return _result(per_layer, self.layers, seen, used, num_samples, settings)


def _attended(sample: EncodedSample) -> torch.Tensor:
    return sample.inputs.get("attention_mask", torch.ones(1, 1))[0].bool()


class KeySpaceRun(MetricRun):
    """:func:`key_space_gap` prepared for one model and probe (:class:`~..runner.MetricRun`)."""

    name = "key_space"

    def __init__(
        self, samples: list[EncodedSample], layers: list[int], options: KeySpaceOptions, keys: str, settings: dict
    ) -> None:
        self.samples, self.layers, self.options, self.keys, self.settings = samples, layers, options, keys, settings

    def accumulator(self) -> KeySpaceAccumulator:
        return KeySpaceAccumulator(self.layers, self.options, keys=self.keys)

    def finish(self, merged: KeySpaceAccumulator) -> KeySpaceResult:
        return merged.result(num_samples=len(self.samples), settings=self.settings)


def key_space_run(
    model: nn.Module | ModelView,
    processor: Any,
    probe: Any = None,
    layers: Iterable[int] | None = None,
    *,
    num_samples: int | None = 100,
    seed: int = 0,
    prompt: str | None = None,
    keys: str = "k_proj",
    options: KeySpaceOptions | None = None,
    run: RunOptions | None = None,
    samples: list[EncodedSample] | None = None,
) -> KeySpaceRun:
    """The key-space gap prepared, not run (arguments: :func:`key_space_gap`); give it to
    :func:`~..runner.run_metrics` to share a probe pass with other metrics.
    ``samples``: the probe already encoded (``prepare_probe(processor, probe, num_samples=..., seed=...,
    prompt=...)``), to share one encoding (and so one pass) between metrics.
    """
    view, options, run = ModelView.of(model), options or KeySpaceOptions(seed=seed), run or RunOptions()
    if keys not in KEY_SPACES:
        raise ValueError(f"keys must be one of {', '.join(KEY_SPACES)}; got {keys!r}")
    selected = view.resolve_layers(layers)
    if samples is None:
        samples = prepare_probe(processor, probe, num_samples=num_samples, seed=seed, prompt=prompt,
                                progress=run.progress)  # fmt: skip
    settings = {"probe": probe_description(probe, len(samples), seed), "batch_size": run.batch_size}
    return KeySpaceRun(samples, selected, options, keys, settings)


def key_space_gap(
    model: nn.Module,
    processor: Any,
    probe: Any = None,
    layers: Iterable[int] | None = None,
    *,
    num_samples: int | None = 100,
    seed: int = 0,
    batch_size: int = UNSET,
    max_samples: int | None = UNSET,
    bandwidth: float | None = UNSET,
    unbiased: bool = UNSET,
    pca_dims: int = UNSET,
    bins: int | None = UNSET,
    jsd_base: float = UNSET,
    clip_quantile: float = UNSET,
    scatter_layers: Iterable[int] | None = UNSET,
    scatter_points: int = UNSET,
    tsne: bool = UNSET,
    device: str | torch.device | None = UNSET,
    prompt: str | None = None,
    keys: str = "k_proj",
    progress: bool = UNSET,
    accelerator: Any = None,
    options: KeySpaceOptions | None = None,
    run: RunOptions | None = None,
) -> KeySpaceResult | None:
    """Key-space gap of ``model`` over a probe set (default: the built-in probe).

    Args:
        model: a supported ``...ForConditionalGeneration`` (GQA models included).
        processor: its processor (not needed when ``probe`` holds encoded samples).
        probe: a :class:`~..probes.probe.Probe`, ``(image, text)`` pairs, or a list of
            :class:`~..probes.encoding.EncodedSample`.
        layers: decoder layers 1..K (negative counts from the end); default all. Layer 0 (the LLM
            input) has no keys.
        num_samples, seed: probe pairs used (a seeded subset when the probe is larger); ``seed`` also seeds the
            key sample unless ``options`` is given (then ``options.seed`` does).
        max_samples, bandwidth, unbiased, pca_dims, bins, jsd_base, clip_quantile, scatter_layers,
            scatter_points, tsne: :class:`~..maths.keyspace.KeySpaceOptions` (defaults there): keys kept per
            modality and layer (a seeded uniform sample of the whole probe; None keeps all), the estimator
            (module docstring), layers (default first, middle, last) and points of the 2-D PCA scatter, a t-SNE
            of those points (``pip install "hf-normalign[tsne]"``).
        batch_size, device, progress: :class:`~..runner.RunOptions` (8, the input embedding's device, on).
        prompt: passed to :func:`~..probes.encoding.prepare_probe`.
        options / run: the options as dataclasses; a keyword that is passed overrides its field.
        keys: the key space, ``"k_proj"``, ``"post_norm"`` or ``"post_rope"`` (module docstring);
            ``settings["keys"]`` states what was taken for this model.
        accelerator: an ``accelerate.Accelerator`` of several processes: the probe is split across them and
            the sampled keys merged on the main process (:mod:`..runner`); the others return None.

    Example:
        >>> from hf_normalign.testing import tiny_model, tiny_processor
        >>> r = key_space_gap(tiny_model("qwen2_vl"), tiny_processor("qwen2_vl"), num_samples=4, progress=False)
        >>> r.layers, len(r.mmd2)
        ([1, 2], 2)
    """
    view = ModelView.of(model)
    options = merge_options(
        KeySpaceOptions, options if options is not None else KeySpaceOptions(seed=seed),
        bandwidth=bandwidth, unbiased=unbiased, max_samples=max_samples, pca_dims=pca_dims, bins=bins,
        jsd_base=jsd_base, clip_quantile=clip_quantile, scatter_layers=scatter_layers, scatter_points=scatter_points,
        tsne=tsne,
    )  # fmt: skip
    run = merge_options(RunOptions, run, batch_size=batch_size, device=device, progress=progress)
    prepared = key_space_run(view, processor, probe, layers, num_samples=num_samples, seed=seed, prompt=prompt,
                             keys=keys, options=options, run=run)  # fmt: skip
    return prepared.run(view, processor, run, accelerator)
