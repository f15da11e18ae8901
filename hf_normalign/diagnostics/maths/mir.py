"""Modality Integration Rate (MIR, arXiv 2410.07167) from per-layer vision and text features.

For every LLM layer k, with V the vision-token and T the text-token hidden states of that layer
(all samples stacked):

1. text-centric scale: alpha_k = 1 / mean_j ||T_j||, applied to both V and T, computed on all
   tokens BEFORE outlier handling (``text_scale=False`` skips it, the paper's ablation);
2. outliers per modality on token L2 norms:

   - ``"replace_median"`` (default, what the reference script ``mir.py`` runs): rows with
     |norm - median(norms)| > 3 * std(norms) are replaced by the per-dimension median of all rows
     of that modality;
   - ``"iqr"`` (the reference's ``replace_outliers_with_iqr_l2``, defined in ``mir_util.py`` but not
     called by its ``mir.py``): rows with a norm outside [Q1 - 1.5 IQR, Q3 + 1.5 IQR] (quartiles by
     linear interpolation, as ``torch.quantile``) are replaced the same way;
   - ``"drop"``: the 3-sigma rows are removed (what the paper text says); ``"none"``: kept.

   ``outlier_stats="torch"`` (default) uses the reference's statistics, ``torch.std`` (unbiased,
   ddof 1) and ``torch.median`` (the LOWER of the two middle values for an even count), both for the
   threshold and for the replacement value; ``"numpy"`` uses ``np.std`` (ddof 0) and ``np.median``
   (mean of the two middle values);
3. FID_k = Fréchet distance of the two sets (covariances with N-1), see :mod:`.frechet`.

MIR = log_base(sum_k FID_k), base 10 by default (as the reference script).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> vision = [torch.randn(300, 16, generator=g) + 2.0 for _ in range(3)]
    >>> text = [torch.randn(200, 16, generator=g) for _ in range(3)]
    >>> res = mir_parts(vision, text)
    >>> len(res["per_layer"]), res["layers"]
    (3, [0, 1, 2])

The numbers come as plain dicts (the fields of :class:`~..metrics.mir.MIRResult`); the result class, the public
``mir_from_features`` and ``StreamingMIR`` (returning it) are in :mod:`..metrics.mir`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .frechet import (
    SQRT_METHODS,
    GaussianMoments,
    SqrtMethod,
    frechet_distance,
    frechet_from_moments,
    to_f64,
)
from .outliers import median, outlier_bounds, outlier_mask

__all__ = ["OUTLIER_MODES", "OUTLIER_STATS", "StreamingMIRStats", "mir_parts"]

OUTLIER_MODES: tuple[str, ...] = ("replace_median", "iqr", "drop", "none")
STREAMING_OUTLIER_MODES: tuple[str, ...] = ("drop", "none")
OUTLIER_STATS: tuple[str, ...] = ("torch", "numpy")
# Default width of the outlier test: 3 standard deviations, or 1.5 IQR for the IQR rule (as the reference).
_DEFAULT_THRESHOLD = {"iqr": 1.5}


def _check_modes(
    outliers: str, sqrt: str, log_base: float, allowed_outliers: tuple[str, ...], outlier_stats: str = "torch"
) -> None:
    if outliers not in allowed_outliers:
        raise ValueError(f"unknown outlier mode {outliers!r}; valid: {', '.join(allowed_outliers)}")
    if outlier_stats not in OUTLIER_STATS:
        raise ValueError(f"unknown outlier_stats {outlier_stats!r}; valid: {', '.join(OUTLIER_STATS)}")
    if sqrt not in SQRT_METHODS:
        raise ValueError(f"unknown sqrt mode {sqrt!r}; valid: {', '.join(SQRT_METHODS)}")
    if not (log_base > 0 and log_base != 1 and math.isfinite(log_base)):
        raise ValueError(f"log_base must be a positive number other than 1, got {log_base!r}")


def _layer_indices(layer_indices: Sequence[int] | None, num_layers: int) -> list[int]:
    if layer_indices is None:
        return list(range(num_layers))
    out = [int(i) for i in layer_indices]
    if len(out) != num_layers:
        raise ValueError(f"layer_indices has {len(out)} entries for {num_layers} layers")
    return out


def _mir_value(per_layer: Sequence[float], log_base: float) -> float:
    """log_base(sum); the sum of exact FIDs is >= 0, so <= 0 means degenerate input or reference_fast."""
    total = math.fsum(per_layer)
    if total > 0:
        return math.log10(total) if log_base == 10 else math.log(total) / math.log(log_base)
    if total == 0:
        warnings.warn("sum of per-layer FIDs is 0 (identical distributions): MIR = -inf", stacklevel=3)
        return float("-inf")
    warnings.warn(
        f"sum of per-layer FIDs is negative ({total:.4g}); only sqrt='reference_fast', which is not a "
        "distance, can produce that: MIR = nan",
        stacklevel=3,
    )
    return float("nan")


def _threshold(outliers: str, threshold: float | None) -> float:
    value = _DEFAULT_THRESHOLD.get(outliers, 3.0) if threshold is None else float(threshold)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"outlier_threshold must be a finite number >= 0, got {threshold!r}")
    return value


def _settings(
    outliers: str,
    threshold: float,
    stats: str,
    text_scale: bool,
    sqrt: str,
    log_base: float,
    streaming: bool,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "outliers": outliers,
        "outlier_threshold": threshold,
        "outlier_stats": stats,
        "sqrt": sqrt,
        "log_base": log_base,
        "text_scale": "1 / mean text-token L2 norm, before outlier handling" if text_scale else "off (alpha = 1)",
        "covariance": "unbiased (N-1)",
        "streaming": streaming,
    }
    out.update(extra or {})
    return out


def _layer_features(v: Any, t: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 vision and text features of one layer, checked, with their per-token L2 norms."""
    vs = to_f64(v, "vision features", name)
    ts = to_f64(t, "text features", name).to(vs.device)
    for what, x in (("vision features", vs), ("text features", ts)):
        if x.ndim != 2:
            raise ValueError(f"{name}: {what} must be 2-D [tokens, dim], got shape {tuple(x.shape)}")
    if vs.shape[1] != ts.shape[1]:
        raise ValueError(f"{name}: vision dim {vs.shape[1]} != text dim {ts.shape[1]}")
    v_norms = torch.linalg.vector_norm(vs, dim=1)
    t_norms = torch.linalg.vector_norm(ts, dim=1)
    for what, norms in (("vision features", v_norms), ("text features", t_norms)):
        bad = int((~torch.isfinite(norms)).sum())  # a NaN/inf entry makes its row's norm non-finite
        if bad:
            raise ValueError(f"{name}: {what} contain non-finite values (NaN/inf) in {bad} row(s)")
    return vs, ts, v_norms, t_norms


def _check_rows(x: torch.Tensor, what: str, name: str) -> None:
    if x.shape[0] < 2:
        raise ValueError(f"{name}: {what} need at least 2 tokens to estimate a covariance, got {x.shape[0]}")


def _text_scale(text_norm_sum: float, count: int, name: str) -> float:
    if count == 0 or text_norm_sum <= 0:
        raise ValueError(f"{name}: text tokens have zero mean norm, the text-centric scale is undefined")
    return count / text_norm_sum


def mir_parts(
    vision_layers: Sequence[Any],
    text_layers: Sequence[Any],
    *,
    outliers: str = "replace_median",
    sqrt: SqrtMethod = "exact",
    log_base: float = 10,
    layer_indices: Sequence[int] | None = None,
    num_samples: int | None = None,
    outlier_threshold: float | None = None,
    outlier_stats: str = "torch",
    text_scale: bool = True,
    extra_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """MIR from per-layer features: ``vision_layers[k]`` [n_k, d], ``text_layers[k]`` [m_k, d]; the fields of a
    :class:`~..metrics.mir.MIRResult` (``metrics.mir.mir_from_features`` returns the result).

    Features may be torch tensors (any float dtype, any device; computed in float64 there) or numpy
    arrays. ``outlier_threshold`` is the width of the outlier test (default 3 standard deviations,
    1.5 IQR for ``outliers="iqr"``); ``outlier_stats`` and ``text_scale`` as in the module docstring.
    Outlier detection uses the unscaled norms: both tests are unchanged when all norms are multiplied
    by the same a > 0, so they equal the reference's tests on scaled features. A layer with fewer than 2
    tokens of a modality (before or after dropping) or with NaN/inf raises ValueError naming it.
    A sum of FIDs of 0 gives MIR = -inf and a negative sum (``sqrt="reference_fast"`` only) NaN, each
    with a warning; per-layer values stay available. ``extra_settings`` (e.g. ``{"final_norm": True}``)
    is merged into ``result.settings``.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> v = [rng.normal(size=(200, 8)) + 1 for _ in range(2)]
        >>> t = [rng.normal(size=(150, 8)) for _ in range(2)]
        >>> res = mir_parts(v, t, outliers="drop", layer_indices=[5, 6], num_samples=4)
        >>> res["layers"], res["settings"]["outliers"]
        ([5, 6], 'drop')
    """
    _check_modes(outliers, sqrt, log_base, OUTLIER_MODES, outlier_stats)
    threshold = _threshold(outliers, outlier_threshold)
    rule = "iqr" if outliers == "iqr" else "sigma"
    if len(vision_layers) != len(text_layers):
        raise ValueError(f"got {len(vision_layers)} vision layers but {len(text_layers)} text layers")
    if len(vision_layers) == 0:
        raise ValueError("no layers given")
    layers = _layer_indices(layer_indices, len(vision_layers))
    per_layer, n_vis, n_txt, out_vis, out_txt, scales = [], [], [], [], [], []
    for layer, v_raw, t_raw in zip(layers, vision_layers, text_layers, strict=True):
        name = f"layer {layer}"
        v, t, v_norms, t_norms = _layer_features(v_raw, t_raw, name)
        _check_rows(v, "vision features", name)
        _check_rows(t, "text features", name)
        alpha = _text_scale(float(t_norms.sum()), t_norms.shape[0], name) if text_scale else 1.0
        v, t = v * alpha, t * alpha
        mask_v = outlier_mask(v_norms, outlier_bounds(v_norms, rule, threshold, outlier_stats))
        mask_t = outlier_mask(t_norms, outlier_bounds(t_norms, rule, threshold, outlier_stats))
        if outliers in ("replace_median", "iqr"):
            # median over all rows, outliers included, as the reference
            v[mask_v] = median(v, outlier_stats, dim=0)
            t[mask_t] = median(t, outlier_stats, dim=0)
        elif outliers == "drop":
            v, t = v[~mask_v], t[~mask_t]
            _check_rows(v, "vision features after dropping outliers", name)
            _check_rows(t, "text features after dropping outliers", name)
        per_layer.append(frechet_distance(v, t, sqrt=sqrt, name=name))
        n_vis.append(v.shape[0])
        n_txt.append(t.shape[0])
        out_vis.append(int(mask_v.sum()) if outliers != "none" else 0)
        out_txt.append(int(mask_t.sum()) if outliers != "none" else 0)
        scales.append(alpha)
    return {
        "mir": _mir_value(per_layer, log_base),
        "per_layer": per_layer,
        "layers": layers,
        "num_samples": num_samples,
        "settings": _settings(outliers, threshold, outlier_stats, text_scale, sqrt, log_base, False, extra_settings),
        "num_vision_tokens": n_vis,
        "num_text_tokens": n_txt,
        "num_vision_outliers": out_vis,
        "num_text_outliers": out_txt,
        "text_scale": scales,
    }


@dataclass
class _LayerState:
    vision: GaussianMoments
    text: GaussianMoments
    text_norm_sum: float = 0.0
    text_norm_count: int = 0
    vision_seen: int = 0  # tokens fed in the current pass (the drop mode checks both passes agree)
    text_seen: int = 0
    vision_norms: list[torch.Tensor] = field(default_factory=list)  # "drop", first pass only
    text_norms: list[torch.Tensor] = field(default_factory=list)
    first_pass_counts: tuple[int, int] = (0, 0)
    vision_bounds: tuple[float, float] | None = None
    text_bounds: tuple[float, float] | None = None
    vision_outliers: int = 0
    text_outliers: int = 0


class StreamingMIRStats:
    """MIR accumulated batch by batch, with memory that does not grow with the data beyond scalars; :meth:`parts`
    gives the fields of a :class:`~..metrics.mir.MIRResult` (``metrics.mir.StreamingMIR`` returns the result).

    Per layer it keeps float64 running moments of vision and text features (O(d^2)) and the sum of
    text-token norms. The text-centric scale alpha = 1 / mean text norm is known only at the end, so
    raw moments are accumulated and scaled then (mean * alpha, covariance * alpha^2), which gives
    exactly FID(alpha V, alpha T) for every ``sqrt`` mode.

    ``outliers="none"`` needs one pass over the data. ``outliers="drop"`` needs two: the median and
    std of token norms over ALL tokens cannot be known in one pass, so the first pass keeps only the
    per-token norms (one float64 per token and layer, on the CPU) and the second accumulates moments
    of the rows that pass the test (statistics per ``outlier_stats``). The caller runs its feature
    capture twice over the same data (any order, any batching). ``"replace_median"`` and ``"iqr"``
    need the per-dimension median of all rows, which no bounded-memory pass gives: use
    :func:`mir_parts` for them. Results equal :func:`mir_parts` with the same mode to rounding (~1e-12 relative).

    Moments live on ``device`` (default: the device of the first batch): 2 * d^2 float64 per layer,
    268 MB per layer at d=4096; pass ``device="cpu"`` to keep them off the GPU.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> def batch():  # one layer: 40 vision and 30 text tokens
        ...     return [torch.randn(40, 8, generator=g) + 1], [torch.randn(30, 8, generator=g)]
        >>> batches = [batch() for _ in range(5)]
        >>> acc = StreamingMIRStats(outliers="drop")
        >>> for _ in range(acc.passes_required):
        ...     for vision, text in batches:
        ...         acc.update(vision, text, num_samples=1)
        ...     acc.end_pass()
        >>> res = acc.parts()
        >>> res["num_samples"], res["settings"]["streaming"]
        (5, True)
    """

    def __init__(
        self,
        *,
        outliers: str = "none",
        sqrt: SqrtMethod = "exact",
        log_base: float = 10,
        layer_indices: Sequence[int] | None = None,
        outlier_threshold: float | None = None,
        outlier_stats: str = "torch",
        text_scale: bool = True,
        device: str | torch.device | None = None,
        extra_settings: Mapping[str, Any] | None = None,
    ) -> None:
        if outliers in ("replace_median", "iqr"):
            raise ValueError(
                f"outliers={outliers!r} needs the per-dimension median of all tokens, which cannot be "
                "streamed in bounded memory; use mir_from_features, or outliers in "
                f"{', '.join(STREAMING_OUTLIER_MODES)}"
            )
        _check_modes(outliers, sqrt, log_base, STREAMING_OUTLIER_MODES, outlier_stats)
        self.outliers = outliers
        self.outlier_stats = outlier_stats
        self.text_scale = text_scale
        self.sqrt = sqrt
        self.log_base = log_base
        self.outlier_threshold = _threshold(outliers, outlier_threshold)
        self.device = device
        self.extra_settings = dict(extra_settings or {})
        self._layer_indices = None if layer_indices is None else [int(i) for i in layer_indices]
        self._layers: list[_LayerState] | None = None
        self.passes_required = 2 if outliers == "drop" else 1
        self.current_pass = 0
        self.num_samples: int | None = None

    def _names(self) -> list[str]:
        assert self._layers is not None
        return [f"layer {i}" for i in _layer_indices(self._layer_indices, len(self._layers))]

    def update(
        self, vision_layers: Sequence[Any], text_layers: Sequence[Any], *, num_samples: int | None = None
    ) -> None:
        """Feed one batch: ``vision_layers[k]`` [n, d] and ``text_layers[k]`` [m, d] for every layer k.

        ``num_samples`` (samples in this batch) is summed over the first pass for the result.
        """
        if self.current_pass >= self.passes_required:
            raise RuntimeError("all passes are finished; call result()")
        if len(vision_layers) != len(text_layers):
            raise ValueError(f"got {len(vision_layers)} vision layers but {len(text_layers)} text layers")
        if self._layers is None:
            if len(vision_layers) == 0:
                raise ValueError("no layers given")
            _layer_indices(self._layer_indices, len(vision_layers))  # validates the count early
            self._layers = [
                _LayerState(GaussianMoments(self.device), GaussianMoments(self.device)) for _ in vision_layers
            ]
        if len(vision_layers) != len(self._layers):
            raise ValueError(f"got {len(vision_layers)} layers, earlier batches had {len(self._layers)}")
        if num_samples is not None and self.current_pass == 0:
            self.num_samples = (self.num_samples or 0) + int(num_samples)
        batch = zip(self._layers, self._names(), vision_layers, text_layers, strict=True)
        for state, name, v_raw, t_raw in batch:
            v, t, v_norms, t_norms = _layer_features(v_raw, t_raw, name)
            if state.vision.dim is not None and v.shape[1] != state.vision.dim:
                raise ValueError(f"{name}: feature dim changed from {state.vision.dim} to {v.shape[1]}")
            state.vision_seen += v.shape[0]
            state.text_seen += t.shape[0]
            if self.outliers == "none":
                state.text_norm_sum += float(t_norms.sum())
                state.text_norm_count += t.shape[0]
                state.vision.update(v)
                state.text.update(t)
            elif self.current_pass == 0:
                state.vision_norms.append(v_norms.cpu())
                state.text_norms.append(t_norms.cpu())
            else:
                assert state.vision_bounds is not None and state.text_bounds is not None
                mask_v = outlier_mask(v_norms, state.vision_bounds)
                mask_t = outlier_mask(t_norms, state.text_bounds)
                state.vision_outliers += int(mask_v.sum())
                state.text_outliers += int(mask_t.sum())
                state.vision.update(v[~mask_v])
                state.text.update(t[~mask_t])

    def merge(self, other: StreamingMIRStats) -> StreamingMIRStats:
        """Fold in ``other``, an accumulator of the same settings over another part of the data (another process),
        in the same pass and before either closed it; exact (Chan's pairwise update), returns ``self``.

        Used by ``mir(..., accelerator=...)``: each process feeds its shard, then the accumulators are merged.
        """
        if (other.outliers, other.passes_required, other.current_pass) != (
            self.outliers,
            self.passes_required,
            self.current_pass,
        ):
            raise ValueError("can only merge accumulators of the same outlier mode in the same pass")
        if other._layers is None:
            return self
        if self._layers is None:
            self._layers = [
                _LayerState(GaussianMoments(self.device), GaussianMoments(self.device)) for _ in other._layers
            ]
        if len(other._layers) != len(self._layers):
            raise ValueError(f"cannot merge {len(other._layers)} layers into {len(self._layers)}")
        if other.num_samples is not None and self.current_pass == 0:
            self.num_samples = (self.num_samples or 0) + other.num_samples
        for mine, theirs in zip(self._layers, other._layers, strict=True):
            mine.vision.merge(theirs.vision)
            mine.text.merge(theirs.text)
            if self.outliers == "none":  # "drop" fixes the text norm sum from all norms at the end of pass 1
                mine.text_norm_sum += theirs.text_norm_sum
                mine.text_norm_count += theirs.text_norm_count
            mine.vision_seen += theirs.vision_seen
            mine.text_seen += theirs.text_seen
            mine.vision_norms += theirs.vision_norms
            mine.text_norms += theirs.text_norms
            mine.vision_outliers += theirs.vision_outliers
            mine.text_outliers += theirs.text_outliers
        return self

    def end_pass(self) -> None:
        """Close the current pass (after the first "drop" pass: fix the outlier bounds and the scale)."""
        if self._layers is None:
            raise RuntimeError("end_pass() before any update()")
        if self.current_pass >= self.passes_required:
            raise RuntimeError("all passes are already finished")
        if self.outliers == "drop" and self.current_pass == 0:
            for state, name in zip(self._layers, self._names(), strict=True):
                v_norms, t_norms = torch.cat(state.vision_norms), torch.cat(state.text_norms)
                for what, norms in (("vision features", v_norms), ("text features", t_norms)):
                    if norms.shape[0] < 2:
                        raise ValueError(f"{name}: {what} need at least 2 rows, got {norms.shape[0]}")
                state.text_norm_sum, state.text_norm_count = float(t_norms.sum()), t_norms.shape[0]
                bounds = ("sigma", self.outlier_threshold, self.outlier_stats)
                state.vision_bounds = outlier_bounds(v_norms, *bounds)
                state.text_bounds = outlier_bounds(t_norms, *bounds)
                state.first_pass_counts = (state.vision_seen, state.text_seen)
                state.vision_norms, state.text_norms = [], []
                state.vision_seen = state.text_seen = 0
        elif self.outliers == "drop":
            for state, name in zip(self._layers, self._names(), strict=True):
                first = state.first_pass_counts
                if (state.vision_seen, state.text_seen) != first:
                    raise ValueError(
                        f"{name}: the second pass saw {state.vision_seen} vision / {state.text_seen} text "
                        f"tokens, the first {first[0]} / {first[1]}; both passes must see the same data"
                    )
        self.current_pass += 1

    def parts(self) -> dict[str, Any]:
        """The MIR of everything fed so far (the result's fields); ends the last pass if it is still open."""
        if self.current_pass == self.passes_required - 1 and self._layers is not None:
            self.end_pass()
        if self._layers is None or self.current_pass < self.passes_required:
            raise RuntimeError(
                f"outliers={self.outliers!r} needs {self.passes_required} pass(es) over the data; "
                f"{self.current_pass} finished"
            )
        per_layer, scales = [], []
        for state, name in zip(self._layers, self._names(), strict=True):
            for what, acc in (("vision features", state.vision), ("text features", state.text)):
                if acc.count < 2:
                    raise ValueError(f"{name}: {what} need at least 2 rows (after outliers), got {acc.count}")
            alpha = _text_scale(state.text_norm_sum, state.text_norm_count, name) if self.text_scale else 1.0
            per_layer.append(
                frechet_from_moments(
                    state.vision.mean * alpha,
                    state.vision.cov * alpha**2,
                    state.text.mean * alpha,
                    state.text.cov * alpha**2,
                    sqrt=self.sqrt,
                    name=name,
                )
            )
            scales.append(alpha)
        return dict(
            mir=_mir_value(per_layer, self.log_base),
            per_layer=per_layer,
            layers=_layer_indices(self._layer_indices, len(self._layers)),
            num_samples=self.num_samples,
            settings=_settings(
                self.outliers,
                self.outlier_threshold,
                self.outlier_stats,
                self.text_scale,
                self.sqrt,
                self.log_base,
                True,
                self.extra_settings,
            ),
            num_vision_tokens=[s.vision.count for s in self._layers],
            num_text_tokens=[s.text.count for s in self._layers],
            num_vision_outliers=[s.vision_outliers for s in self._layers],
            num_text_outliers=[s.text_outliers for s in self._layers],
            text_scale=scales,
        )
