"""Layer-wise norm and update-rate profiles of vision and text tokens (the Unseen-Bias diagnostics).

For every hidden state l of the LLM (0 = its input, k = the output of decoder layer k) and for each
modality (vision tokens, text-passage tokens), :func:`modality_profile` reports

- the L2 norm of the tokens: mean, standard deviation (ddof 1) and median, plus the ratio
  mean vision norm / mean text norm;
- the update-rate proxy of decoder layer l + 1: the adjacent-layer cosine similarity
  mean_i cos(h_i^(l), h_i^(l+1)) over the tokens i of that modality. A value near 1 means the layer
  barely rotates those tokens ("representational inertia" of high-norm vision tokens in a Pre-Norm
  residual stream).

Along the vision path (the norm paper's RQ1/RQ2 measurements, arXiv 2512.08374), :func:`modality_profile`
also reports the per-row L2 norms of the vision-encoder output (the projector's input), of the projector's
output before hf-normalign's LayerNorm, of the vision tokens at the LLM input (after it) and of the
text-passage embeddings, in ``vision_path_norms``; and for a model patched with ``projector_norm`` the
LayerNorm gain statistics (:func:`projector_gain_stats`) in ``projector_gain``.

The maths is in :mod:`..maths.norms` (:func:`norm_stats`, :func:`adjacent_cosine`); :func:`profile_from_features`
works on feature tensors; :func:`modality_profile` runs the model over a probe with :func:`~..runner.run_probe`
and streams the batches through :class:`ProfileAccumulator`, so no layer's tokens are kept beyond one batch
(only the per-token norms are).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> vision = [torch.randn(50, 8, generator=g) * 40 for _ in range(3)]   # loud vision tokens
    >>> text = [torch.randn(30, 8, generator=g) for _ in range(3)]
    >>> prof = profile_from_features(vision, text)
    >>> prof.layers, prof.update_layers
    ([0, 1, 2], [1, 2])
    >>> prof.norm_ratio[0] > 10
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...model_view import ModelView
from ...registry import embedding_scale
from ..engine import CaptureBatch
from ..maths.features import as_features
from ..maths.norms import adjacent_cosine, norm_stats, norm_summary, token_cosines
from ..options import UNSET, merge_options
from ..probes.encoding import EncodedSample, prepare_probe, probe_description
from ..results import Column, Result, Table, first_last, mean
from ..runner import Accumulator, CaptureRequest, MetricRun, RunOptions

__all__ = [
    "VISION_PATH_STAGES",
    "ModalityProfile",
    "ProfileAccumulator",
    "ProfileOptions",
    "ProfileRun",
    "adjacent_cosine",
    "modality_profile",
    "norm_stats",
    "profile_from_features",
    "profile_run",
    "projector_gain_stats",
]

# vision_path_norms keys, in the order a vision token passes them
VISION_PATH_STAGES: tuple[str, ...] = (
    "vision_encoder_output",
    "projector_output",
    "llm_input_vision",
    "text_embedding",
)


@dataclass
class ModalityProfile(Result):
    """Per-layer norm statistics and adjacent-layer cosines of vision and text tokens.

    Attributes:
        layers: hidden-state numbers (0 = LLM input, k = output of decoder layer k).
        vision_norm_mean / vision_norm_std / vision_norm_median: L2 norm of vision tokens per layer.
        text_norm_mean / text_norm_std / text_norm_median: the same for the text-passage tokens.
        norm_ratio: vision_norm_mean / text_norm_mean per layer.
        update_layers: the decoder layers l + 1 whose update the cosines describe (one per pair of
            consecutive numbers in ``layers``).
        vision_update_cos / text_update_cos: mean_i cos(h_i^(l), h_i^(l+1)) per modality.
        num_samples: probe pairs behind the numbers (None when unknown).
        num_vision_tokens / num_text_tokens: tokens per layer.
        settings: how it was computed (final_norm, probe, std ddof...).
        vision_path_norms: stage (:data:`VISION_PATH_STAGES`) -> per-row L2 norm summary (mean, std,
            median, min, max, count), filled by :func:`modality_profile`: ``vision_encoder_output`` = the
            rows the main projector receives (Qwen's merger: one row per patch, before the 2x2 merge),
            ``projector_output`` = its output rows before hf-normalign's LayerNorm (all rows, before any
            later reshaping), ``llm_input_vision`` / ``text_embedding`` = vision / text-passage tokens at the
            LLM input (layer 0).
        projector_gain: :func:`projector_gain_stats` of the model (None when it has no projector LayerNorm).

    Example:
        >>> import torch
        >>> p = profile_from_features([torch.ones(4, 2), 2 * torch.ones(4, 2)], [torch.eye(2)] * 2)
        >>> round(p.vision_update_cos[0], 6), round(p.norm_ratio[1], 4)
        (1.0, 2.8284)
    """

    layers: list[int]
    vision_norm_mean: list[float]
    vision_norm_std: list[float]
    vision_norm_median: list[float]
    text_norm_mean: list[float]
    text_norm_std: list[float]
    text_norm_median: list[float]
    norm_ratio: list[float]
    update_layers: list[int]
    vision_update_cos: list[float]
    text_update_cos: list[float]
    num_samples: int | None
    num_vision_tokens: int
    num_text_tokens: int
    settings: dict[str, Any] = field(default_factory=dict)
    vision_path_norms: dict[str, dict[str, float]] = field(default_factory=dict)
    projector_gain: dict[str, Any] | None = None

    TABLES = (
        Table(
            "layers",
            "layer",
            (
                Column("vision_norm_mean", "|vision| mean"),
                Column("vision_norm_std", "|vision| std"),
                Column("vision_norm_median", "|vision| median"),
                Column("text_norm_mean", "|text| mean"),
                Column("text_norm_std", "|text| std"),
                Column("text_norm_median", "|text| median"),
                Column("norm_ratio", "ratio"),
            ),
        ),
        Table(
            "update_layers",
            "decoder layer",
            (Column("vision_update_cos", "cos vision", ".4f"), Column("text_update_cos", "cos text", ".4f")),
        ),
    )

    def __str__(self) -> str:
        return f"ModalityProfile ({self.num_samples} samples)\n{self.format_table()}"

    def summary(self) -> dict[str, float | None]:
        """Headline numbers for the report: the vision/text norm ratio at the LLM input and the last layer, the
        mean update cosines, the vision-path norms and the projector gain (None where not measured)."""
        out: dict[str, float | None] = {}
        out["norm_ratio_input"], out["norm_ratio_last"] = first_last(self.norm_ratio, self.layers)
        out["vision_update_cos_mean"] = mean(self.vision_update_cos) if self.update_layers else None
        out["text_update_cos_mean"] = mean(self.text_update_cos) if self.update_layers else None
        out["vision_encoder_norm"] = self.vision_path_norms.get("vision_encoder_output", {}).get("mean")
        out["projector_output_norm"] = self.vision_path_norms.get("projector_output", {}).get("mean")
        out["gain_mean_abs"] = self.projector_gain["mean_abs"] if self.projector_gain else None
        out["gain_mean_abs_to_init"] = self.projector_gain["mean_abs_to_init"] if self.projector_gain else None
        return out


@dataclass(frozen=True)
class ProfileOptions:
    """How :func:`modality_profile` measures: ``layers`` (hidden-state numbers 0..K; default all, 0 included) and
    ``final_norm`` (False, the default: layer K before the final norm, whose RMSNorm rescales every token to about
    its weight's size and would hide the norm gap at the last layer).

    Example:
        >>> ProfileOptions(layers=[2, 0])
        ProfileOptions(layers=(2, 0), final_norm=False)
    """

    layers: tuple[int, ...] | None = None
    final_norm: bool = False

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))


class ProfileAccumulator(Accumulator):
    """Streams batches of per-layer features into a :class:`ModalityProfile`.

    Each :meth:`update` takes one batch for every layer in ``layers`` (rows are the same tokens at every
    layer): a :class:`~..engine.CaptureBatch`, or the vision and text features as layer -> [rows, dim]
    dicts. Only per-token norms and running cosine sums are kept. With ``vision_path=True`` (what
    :func:`modality_profile` uses) it also records the norms along the vision path (layer 0 is captured for
    them, and :meth:`attach` hooks the projector).

    Example:
        >>> import torch
        >>> acc = ProfileAccumulator([0, 1])
        >>> for _ in range(2):
        ...     acc.update({0: torch.ones(3, 4), 1: torch.ones(3, 4)}, {0: torch.eye(4), 1: torch.eye(4)})
        >>> acc.result().num_vision_tokens
        6
    """

    def __init__(
        self, layers: Sequence[int], *, eps: float = 1e-12, final_norm: bool = False, vision_path: bool = False
    ) -> None:
        self.layers = sorted(int(i) for i in layers)
        if not self.layers:
            raise ValueError("no layers given")
        self.pairs = [(a, b) for a, b in zip(self.layers, self.layers[1:], strict=False) if b == a + 1]
        self.eps = eps
        self.vision_path = vision_path
        captured = sorted({0, *self.layers}) if vision_path else self.layers
        self.request = CaptureRequest(tuple(captured), final_norm=final_norm)
        self._norms: dict[str, dict[int, list[torch.Tensor]]] = {"vision": {}, "text": {}}
        self._cos: dict[str, dict[int, float]] = {"vision": {}, "text": {}}
        self._count = {"vision": 0, "text": 0}
        self._path: dict[str, list[torch.Tensor]] = {stage: [] for stage in VISION_PATH_STAGES}

    def update(self, batch: CaptureBatch | Mapping[int, Any], text: Mapping[int, Any] | None = None) -> None:
        """Add one batch: a ``CaptureBatch``, or ``vision[layer]`` [n_v, d] and ``text[layer]`` [n_t, d]."""
        if isinstance(batch, CaptureBatch):
            vision, text = batch.vision, batch.text
            if self.vision_path:
                self.add_path("llm_input_vision", vision[0])
                self.add_path("text_embedding", text[0])
        else:
            vision = batch
            if text is None:
                raise ValueError("update(vision, text) needs the text features too")
        for kind, feats in (("vision", vision), ("text", text)):
            missing = [layer for layer in self.layers if layer not in feats]
            if missing:
                raise ValueError(f"{kind} features are missing layers {missing}")
            xs = {
                layer: as_features(feats[layer], f"{kind} features of layer {layer}", min_rows=0)
                for layer in self.layers
            }
            rows = {x.shape[0] for x in xs.values()}
            if len(rows) != 1:
                raise ValueError(f"{kind} features must hold the same tokens at every layer, got row counts {rows}")
            for layer, x in xs.items():
                self._norms[kind].setdefault(layer, []).append(x.norm(dim=1).cpu())
            for a, b in self.pairs:
                cos = token_cosines(xs[a], xs[b].to(xs[a].device), self.eps)
                self._cos[kind][b] = self._cos[kind].get(b, 0.0) + float(cos.sum())
            self._count[kind] += rows.pop()

    def add_path(self, stage: str, rows: torch.Tensor) -> None:
        """Record the per-row L2 norms of ``rows`` [..., dim] at vision-path ``stage``."""
        rows = rows.detach()
        self._path[stage].append(rows.reshape(-1, rows.shape[-1]).double().norm(dim=1).cpu())

    def merge(self, other: ProfileAccumulator) -> None:
        for kind in ("vision", "text"):
            for layer, norms in other._norms[kind].items():
                self._norms[kind].setdefault(layer, []).extend(norms)
            for layer, cos in other._cos[kind].items():
                self._cos[kind][layer] = self._cos[kind].get(layer, 0.0) + cos
            self._count[kind] += other._count[kind]
        for stage, norms in other._path.items():
            self._path[stage].extend(norms)

    def attach(self, view: ModelView, samples: Sequence[Any]) -> contextlib.AbstractContextManager[None]:
        return _projector_hooks(view, self) if self.vision_path else contextlib.nullcontext()

    def result(self, *, num_samples: int | None = None, settings: dict[str, Any] | None = None) -> ModalityProfile:
        """The profile of everything added so far; ValueError when a modality has no tokens."""
        for kind, what in (("vision", "vision"), ("text", "text-passage")):
            if self._count[kind] == 0:
                raise ValueError(f"no {what} tokens were seen; the profile needs both modalities")
        stats = {
            kind: [norm_summary(torch.cat(self._norms[kind][layer])) for layer in self.layers]
            for kind in ("vision", "text")
        }
        vm, tm = [s["mean"] for s in stats["vision"]], [s["mean"] for s in stats["text"]]
        return ModalityProfile(
            layers=list(self.layers),
            vision_norm_mean=vm,
            vision_norm_std=[s["std"] for s in stats["vision"]],
            vision_norm_median=[s["median"] for s in stats["vision"]],
            text_norm_mean=tm,
            text_norm_std=[s["std"] for s in stats["text"]],
            text_norm_median=[s["median"] for s in stats["text"]],
            norm_ratio=[v / t if t > 0 else math.inf for v, t in zip(vm, tm, strict=True)],
            update_layers=[b for _, b in self.pairs],
            vision_update_cos=[self._cos["vision"][b] / self._count["vision"] for _, b in self.pairs],
            text_update_cos=[self._cos["text"][b] / self._count["text"] for _, b in self.pairs],
            num_samples=num_samples,
            num_vision_tokens=self._count["vision"],
            num_text_tokens=self._count["text"],
            settings={"norm_std_ddof": 1, **(settings or {})},
            vision_path_norms={stage: norm_summary(torch.cat(n)) for stage, n in self._path.items() if n},
        )


def profile_from_features(
    vision_layers: Sequence[Any],
    text_layers: Sequence[Any],
    *,
    layers: Sequence[int] | None = None,
    num_samples: int | None = None,
) -> ModalityProfile:
    """Profile from stacked features: ``vision_layers[j]`` [n_v, d] and ``text_layers[j]`` [n_t, d].

    Row i of every ``vision_layers[j]`` must be the same token (likewise for text). ``layers`` numbers
    the entries (default 0, 1, ...); cosines are reported for consecutive numbers only.

    Example:
        >>> import torch
        >>> profile_from_features([torch.ones(2, 3)], [torch.ones(2, 3)], layers=[5]).layers
        [5]
    """
    if len(vision_layers) != len(text_layers):
        raise ValueError(f"got {len(vision_layers)} vision layers but {len(text_layers)} text layers")
    if len(vision_layers) == 0:
        raise ValueError("no layers given")
    numbers = list(range(len(vision_layers))) if layers is None else [int(i) for i in layers]
    if len(numbers) != len(vision_layers) or len(set(numbers)) != len(numbers):
        raise ValueError(f"layers must number the {len(vision_layers)} entries uniquely, got {numbers}")
    acc = ProfileAccumulator(numbers)
    acc.update(dict(zip(numbers, vision_layers, strict=True)), dict(zip(numbers, text_layers, strict=True)))
    return acc.result(num_samples=num_samples)


def projector_gain_stats(model: nn.Module) -> dict[str, Any] | None:
    """Gain statistics of the projector LayerNorm of a model patched with ``projector_norm`` (main projector,
    ``model.normalign.projector_norm[0].weight`` = g, D entries); None when the model has none.

    Returns ``mean_abs`` = mean |g|, ``l2`` = ||g||_2, ``init_value`` = T / sqrt(D) (every entry of g at
    init, so mean |g| starts there and ||g||_2 starts at T), ``mean_abs_to_init`` = mean |g| / (T / sqrt(D))
    and ``l2_to_init`` = ||g||_2 / T (both 1 while the gain is untouched), ``gwc_scale`` = 1 / max(mean |g|,
    gwc_floor), the factor GWC applies to the projector's gradient now (None without GWC), ``target_norm``
    T with ``target_norm_source``, and ``hidden_size`` D. T is the configured ``target_norm`` or, when
    that is None, the mean L2 norm of the input-embedding rows, recomputed as ``patch`` computes it.

    Example:
        >>> import hf_normalign
        >>> from hf_normalign.testing import tiny_model
        >>> stats = projector_gain_stats(hf_normalign.patch(tiny_model("llava"), methods=["projector_norm"]))
        >>> round(stats["mean_abs_to_init"], 6), round(stats["l2_to_init"], 6)
        (1.0, 1.0)
    """
    base = ModelView.of(model).base
    plugin = getattr(base, "normalign", None)
    norms = getattr(plugin, "projector_norm", None)
    if norms is None:
        return None
    config = plugin.config.projector_norm
    g = norms[0].weight.detach().double()
    hidden = g.numel()
    target = config.target_norm if config.target_norm is not None else embedding_scale(base, plugin.spec)
    mean_abs, l2 = float(g.abs().mean()), float(g.norm())
    init = target / math.sqrt(hidden)
    return {
        "mean_abs": mean_abs,
        "l2": l2,
        "init_value": init,
        "mean_abs_to_init": mean_abs / init,
        "l2_to_init": l2 / target,
        "gwc_scale": 1.0 / max(mean_abs, config.gwc_floor) if config.gwc else None,
        "target_norm": target,
        "target_norm_source": "ProjectorNormConfig.target_norm"
        if config.target_norm is not None
        else "mean L2 norm of the input-embedding rows (as patch computes it)",
        "hidden_size": hidden,
    }


@contextlib.contextmanager
def _projector_hooks(view: ModelView, acc: ProfileAccumulator) -> Iterator[None]:
    """Per-row norms of the main projector's input and output into ``acc``, by plain hooks (nothing changed).

    The output hook runs ahead of every other forward hook of the projector (``prepend``), so it sees the
    projector's own output, before hf-normalign's LayerNorm hook replaces it.
    """
    projector = view.projector

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        acc.add_path("vision_encoder_output", first)

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        acc.add_path("projector_output", output[0] if isinstance(output, (tuple, list)) else output)

    handles = [
        projector.register_forward_pre_hook(before, with_kwargs=True),
        projector.register_forward_hook(after, prepend=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class ProfileRun(MetricRun):
    """:func:`modality_profile` prepared for one model and probe (:class:`~..runner.MetricRun`)."""

    name = "profile"

    def __init__(self, view: ModelView, samples: list[EncodedSample], options: ProfileOptions, settings: dict) -> None:
        self.view, self.samples, self.options, self.settings = view, samples, options, settings
        self.layers = view.resolve_layers(options.layers, include_embeddings=options.layers is None)

    def accumulator(self) -> ProfileAccumulator:
        return ProfileAccumulator(self.layers, final_norm=self.options.final_norm, vision_path=True)

    def finish(self, merged: ProfileAccumulator) -> ModalityProfile:
        profile = merged.result(num_samples=len(self.samples), settings=self.settings)
        profile.projector_gain = projector_gain_stats(self.view)
        return profile


def profile_run(
    model: nn.Module | ModelView,
    processor: Any,
    probe: Any = None,
    *,
    num_samples: int | None = 100,
    seed: int = 0,
    prompt: str | None = None,
    options: ProfileOptions | None = None,
    run: RunOptions | None = None,
    samples: list[EncodedSample] | None = None,
) -> ProfileRun:
    """The profile prepared, not run: the probe encoded, the layers resolved (arguments: :func:`modality_profile`);
    give it to :func:`~..runner.run_metrics` to share a probe pass with other metrics.
    ``samples``: the probe already encoded (``prepare_probe(processor, probe, num_samples=..., seed=...,
    prompt=...)``), to share one encoding (and so one pass) between metrics.
    """
    view, options, run = ModelView.of(model), options or ProfileOptions(), run or RunOptions()
    if samples is None:
        samples = prepare_probe(processor, probe, num_samples=num_samples, seed=seed, prompt=prompt,
                                progress=run.progress)  # fmt: skip
    settings = {
        "final_norm": options.final_norm,
        "probe": probe_description(probe, len(samples), seed),
        "batch_size": run.batch_size,
    }
    return ProfileRun(view, samples, options, settings)


def modality_profile(
    model: nn.Module,
    processor: Any,
    probe: Any = None,
    *,
    num_samples: int | None = 100,
    seed: int = 0,
    layers: Iterable[int] | None = UNSET,
    batch_size: int = UNSET,
    final_norm: bool = UNSET,
    device: str | torch.device | None = UNSET,
    prompt: str | None = None,
    progress: bool = UNSET,
    accelerator: Any = None,
    options: ProfileOptions | None = None,
    run: RunOptions | None = None,
) -> ModalityProfile | None:
    """Norm and update-rate profile of ``model`` over a probe set (default: the built-in probe).

    Args:
        model: a supported ``...ForConditionalGeneration`` model.
        processor: its processor (not needed when ``probe`` holds encoded samples).
        probe: a :class:`~..probes.probe.Probe`, ``(image, text)`` pairs, or a list of
            :class:`~..probes.encoding.EncodedSample`.
        num_samples: pairs drawn (seeded) from a :class:`~..probes.probe.Probe` / the default probe; None = all.
        seed: seed of that draw.
        layers, final_norm: :class:`ProfileOptions` (default: every layer 0..K, layer K before the final norm).
        batch_size, device, progress: :class:`~..runner.RunOptions` (8, the input embedding's device, on).
        prompt: passed to :func:`~..probes.encoding.prepare_probe`.
        accelerator: an ``accelerate.Accelerator`` of several processes: the probe is split across them and
            the statistics merged on the main process (:mod:`..runner`); the others return None.
        options / run: the options as dataclasses; a keyword that is passed overrides its field.

    Example:
        >>> from hf_normalign.testing import tiny_model, tiny_processor
        >>> prof = modality_profile(tiny_model("llava"), tiny_processor("llava"), num_samples=4, progress=False)
        >>> prof.layers, len(prof.vision_update_cos)
        ([0, 1, 2], 2)
    """
    view = ModelView.of(model)
    options = merge_options(ProfileOptions, options, layers=layers, final_norm=final_norm)
    run = merge_options(RunOptions, run, batch_size=batch_size, device=device, progress=progress)
    prepared = profile_run(view, processor, probe, num_samples=num_samples, seed=seed, prompt=prompt,
                           options=options, run=run)  # fmt: skip
    return prepared.run(view, processor, run, accelerator)
