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

The math is in plain functions on feature tensors (:func:`norm_stats`, :func:`adjacent_cosine`,
:func:`profile_from_features`); :func:`modality_profile` runs a model over a probe set with the
capture engine and streams the batches through :class:`ProfileAccumulator`, so no layer's tokens
are kept beyond one batch (only the per-token norms are).

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .frechet import _to_f64

__all__ = [
    "VISION_PATH_STAGES",
    "ModalityProfile",
    "ProfileAccumulator",
    "adjacent_cosine",
    "modality_profile",
    "norm_stats",
    "profile_from_features",
    "projector_gain_stats",
]

# vision_path_norms keys, in the order a vision token passes them
VISION_PATH_STAGES: tuple[str, ...] = (
    "vision_encoder_output",
    "projector_output",
    "llm_input_vision",
    "text_embedding",
)


def json_float(x: float | None) -> float | str | None:
    """A float for strict JSON: NaN / inf become the strings "nan" / "inf" / "-inf" (``float()`` reads them back)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


def json_floats(values: Iterable[float | None] | None) -> list[float | str | None] | None:
    return None if values is None else [json_float(v) for v in values]


def as_features(x: Any, what: str, *, min_rows: int = 1) -> torch.Tensor:
    """``x`` as a float64 [rows, dim] tensor on its own device; ValueError naming ``what`` otherwise."""
    t = _to_f64(x, what, None)
    if t.ndim != 2:
        raise ValueError(f"{what} must be 2-D [tokens, dim], got shape {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise ValueError(f"{what}: need at least {min_rows} tokens, got {t.shape[0]}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains non-finite values (NaN/inf)")
    return t


# ----------------------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------------------


def _stats_of_norms(norms: torch.Tensor) -> dict[str, float]:
    return {
        "mean": float(norms.mean()),
        "std": float(norms.std(correction=1)) if norms.numel() > 1 else math.nan,
        "median": float(np.median(norms.cpu().numpy())),
        "min": float(norms.min()),
        "max": float(norms.max()),
        "count": int(norms.numel()),
    }


def norm_stats(features: Any) -> dict[str, float]:
    """Summary of the per-token L2 norms of ``features`` [tokens, dim], in float64.

    Returns ``mean``, ``std`` (sample standard deviation, ddof 1; NaN for a single token),
    ``median`` (the average of the two middle values for an even count), ``min``, ``max``, ``count``.

    Example:
        >>> import torch
        >>> norm_stats(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))["mean"]
        3.0
    """
    x = as_features(features, "features")
    return _stats_of_norms(x.norm(dim=1))


def _token_cosines(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    # Clamp each norm separately: a zero token then has cosine 0 with anything, not NaN.
    na = a.norm(dim=1).clamp_min(eps)
    nb = b.norm(dim=1).clamp_min(eps)
    return (a * b).sum(dim=1) / (na * nb)


def adjacent_cosine(h_l: Any, h_next: Any, *, eps: float = 1e-12) -> float:
    """Update-rate proxy: the mean over tokens i of cos(h_l[i], h_next[i]), in float64.

    ``h_l`` and ``h_next`` are [tokens, dim] with row i the same token at two adjacent layers. A
    token with zero norm contributes cosine 0.

    Example:
        >>> import torch
        >>> adjacent_cosine(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        0.5
    """
    a = as_features(h_l, "h_l")
    b = as_features(h_next, "h_next").to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"h_l {tuple(a.shape)} and h_next {tuple(b.shape)} must hold the same tokens")
    return float(_token_cosines(a, b, eps).mean())


# ----------------------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ModalityProfile:
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (non-finite floats as strings); :meth:`from_dict` inverts it."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, list) and value and isinstance(value[0], float):
                out[key] = json_floats(value)
        out["vision_path_norms"] = {
            stage: {k: json_float(v) if isinstance(v, float) else v for k, v in stats.items()}
            for stage, stats in self.vision_path_norms.items()
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModalityProfile:
        kwargs = dict(data)
        for key in (
            "vision_norm_mean",
            "vision_norm_std",
            "vision_norm_median",
            "text_norm_mean",
            "text_norm_std",
            "text_norm_median",
            "norm_ratio",
            "vision_update_cos",
            "text_update_cos",
        ):
            kwargs[key] = [float(v) for v in kwargs[key]]
        kwargs["vision_path_norms"] = {
            stage: {k: v if k == "count" else float(v) for k, v in stats.items()}
            for stage, stats in kwargs.get("vision_path_norms", {}).items()
        }
        return cls(**kwargs)

    def format_table(self) -> str:
        """Plain-text table: norms per modality, their ratio, and the cosine of the layer's update."""
        cos = dict(zip(self.update_layers, zip(self.vision_update_cos, self.text_update_cos, strict=True), strict=True))
        head = f"{'layer':>5}  {'|vision|':>17}  {'|text|':>17}  {'ratio':>8}  {'cos vision':>10}  {'cos text':>9}"
        lines = [head, "-" * len(head)]
        for i, layer in enumerate(self.layers):
            v = f"{self.vision_norm_mean[i]:.4g} ± {self.vision_norm_std[i]:.3g}"
            t = f"{self.text_norm_mean[i]:.4g} ± {self.text_norm_std[i]:.3g}"
            cv, ct = (f"{c:.4f}" for c in cos[layer]) if layer in cos else ("", "")
            lines.append(f"{layer:>5}  {v:>17}  {t:>17}  {self.norm_ratio[i]:>8.3g}  {cv:>10}  {ct:>9}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"ModalityProfile ({self.num_samples} samples)\n{self.format_table()}"


# ----------------------------------------------------------------------------------------------------------
# Streaming accumulation
# ----------------------------------------------------------------------------------------------------------


class ProfileAccumulator:
    """Streams batches of per-layer features into a :class:`ModalityProfile`.

    Each :meth:`update` takes the features of one batch for every layer in ``layers`` (rows are the
    same tokens at every layer). Only per-token norms and running cosine sums are kept.

    Example:
        >>> import torch
        >>> acc = ProfileAccumulator([0, 1])
        >>> for _ in range(2):
        ...     acc.update({0: torch.ones(3, 4), 1: torch.ones(3, 4)}, {0: torch.eye(4), 1: torch.eye(4)})
        >>> acc.result().num_vision_tokens
        6
    """

    def __init__(self, layers: Sequence[int], *, eps: float = 1e-12) -> None:
        self.layers = sorted(int(i) for i in layers)
        if not self.layers:
            raise ValueError("no layers given")
        self.pairs = [(a, b) for a, b in zip(self.layers, self.layers[1:], strict=False) if b == a + 1]
        self.eps = eps
        self._norms: dict[str, dict[int, list[torch.Tensor]]] = {"vision": {}, "text": {}}
        self._cos: dict[str, dict[int, float]] = {"vision": {}, "text": {}}
        self._count = {"vision": 0, "text": 0}

    def update(self, vision: dict[int, Any], text: dict[int, Any]) -> None:
        """Add one batch: ``vision[layer]`` [n_v, d] and ``text[layer]`` [n_t, d] for every layer."""
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
                cos = _token_cosines(xs[a], xs[b].to(xs[a].device), self.eps)
                self._cos[kind][b] = self._cos[kind].get(b, 0.0) + float(cos.sum())
            self._count[kind] += rows.pop()

    def result(self, *, num_samples: int | None = None, settings: dict[str, Any] | None = None) -> ModalityProfile:
        """The profile of everything added so far; ValueError when a modality has no tokens."""
        for kind, what in (("vision", "vision"), ("text", "text-passage")):
            if self._count[kind] == 0:
                raise ValueError(f"no {what} tokens were seen; the profile needs both modalities")
        stats = {
            kind: [_stats_of_norms(torch.cat(self._norms[kind][layer])) for layer in self.layers]
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


# ----------------------------------------------------------------------------------------------------------
# Model level
# ----------------------------------------------------------------------------------------------------------


def _unwrapped(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # PEFT wrapper -> the transformers model
    return get_base() if callable(get_base) else model


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
    from ..registry import embedding_scale

    base = _unwrapped(model)
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


class _VisionPath:
    """Per-row norms of the main projector's input and output, recorded by plain hooks (nothing changed).

    The output hook runs ahead of every other forward hook of the projector (``prepend``), so it sees the
    projector's own output, before hf-normalign's LayerNorm hook replaces it.
    """

    def __init__(self, model: nn.Module) -> None:
        from ..registry import get_spec

        base = _unwrapped(model)
        spec = get_spec(base)
        self.projector = spec.get(base, spec.projector)
        self.norms: dict[str, list[torch.Tensor]] = {stage: [] for stage in VISION_PATH_STAGES}

    def add(self, stage: str, rows: torch.Tensor) -> None:
        rows = rows.detach()
        self.norms[stage].append(rows.reshape(-1, rows.shape[-1]).double().norm(dim=1).cpu())

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
            first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            self.add("vision_encoder_output", first)

        def after(module: nn.Module, args: tuple, output: Any) -> None:
            self.add("projector_output", output[0] if isinstance(output, (tuple, list)) else output)

        handles = [
            self.projector.register_forward_pre_hook(before, with_kwargs=True),
            self.projector.register_forward_hook(after, prepend=True),
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def result(self) -> dict[str, dict[str, float]]:
        return {stage: _stats_of_norms(torch.cat(n)) for stage, n in self.norms.items() if n}


def probe_description(probe: Any, used: int, seed: int) -> str:
    """How a probe argument is named in ``settings``."""
    if probe is None:
        return f"default, {used} pairs (seed {seed})"
    name = getattr(probe, "name", None)
    return f"{name}, {used} pairs used" if name else f"{used} pairs"


def encoded_probe(
    processor: Any, probe: Any, num_samples: int | None, seed: int, prompt: str | None, progress: bool
) -> list[Any]:
    """The probe encoded for the model (``capture.prepare_probe``) with a clear error when it is empty."""
    from .capture import prepare_probe

    return prepare_probe(processor, probe, num_samples=num_samples, seed=seed, prompt=prompt, progress=progress)


def modality_profile(
    model: nn.Module,
    processor: Any,
    probe: Any = None,
    *,
    num_samples: int | None = 100,
    seed: int = 0,
    layers: Iterable[int] | None = None,
    batch_size: int = 8,
    final_norm: bool = False,
    device: str | torch.device | None = None,
    prompt: str | None = None,
    progress: bool = True,
) -> ModalityProfile:
    """Norm and update-rate profile of ``model`` over a probe set (default: the built-in probe).

    Args:
        model: a supported ``...ForConditionalGeneration`` model.
        processor: its processor (not needed when ``probe`` holds encoded samples).
        probe: a :class:`~.probe.Probe`, ``(image, text)`` pairs, or ``capture.EncodedSample`` list.
        num_samples: pairs drawn (seeded) from a :class:`~.probe.Probe` / the default probe; None = all.
        seed: seed of that draw.
        layers: hidden-state numbers, 0 (LLM input) .. K (last decoder layer); default all of them.
        batch_size: samples per forward pass.
        final_norm: False (default) reports layer K before the final norm. The final RMSNorm rescales
            every token to about its weight's size and would hide the norm gap at the last layer.
        device, prompt: passed to :func:`~.capture.capture`.
        progress: tqdm progress bars.

    Example:
        >>> from hf_normalign.testing import tiny_model, tiny_processor
        >>> prof = modality_profile(tiny_model("llava"), tiny_processor("llava"), num_samples=4, progress=False)
        >>> prof.layers, len(prof.vision_update_cos)
        ([0, 1, 2], 2)
    """
    from .capture import capture, resolve_layers

    selected = resolve_layers(model, layers, include_embeddings=layers is None)
    samples = encoded_probe(processor, probe, num_samples, seed, prompt, progress)
    acc = ProfileAccumulator(selected)
    path = _VisionPath(model)
    with path.hooks():
        for batch in capture(
            model,
            processor,
            samples,
            layers=sorted({0, *selected}),  # layer 0 feeds vision_path_norms even when not profiled
            final_norm=final_norm,
            batch_size=batch_size,
            device=device,
            progress=progress,
        ):
            acc.update(batch.vision, batch.text)
            path.add("llm_input_vision", batch.vision[0])
            path.add("text_embedding", batch.text[0])
    settings = {
        "final_norm": final_norm,
        "probe": probe_description(probe, len(samples), seed),
        "batch_size": batch_size,
    }
    profile = acc.result(num_samples=len(samples), settings=settings)
    profile.vision_path_norms = path.result()
    profile.projector_gain = projector_gain_stats(model)
    return profile
