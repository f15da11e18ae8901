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

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    >>> abs(mmd2_rbf(x, y)) < 0.02          # same distribution
    True
    >>> mmd2_rbf(x, y + 2.0) > 0.3          # shifted
    True
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .profile import as_features, encoded_probe, json_floats, probe_description

__all__ = [
    "KEY_SPACES",
    "KeySpaceResult",
    "auto_bins",
    "jsd_histograms",
    "jsd_pca",
    "key_space_from_features",
    "key_space_gap",
    "median_bandwidth",
    "mmd2_rbf",
    "pca_basis",
    "pca_histograms",
    "subsample",
    "tsne_2d",
]

KEY_SPACES: tuple[str, ...] = ("k_proj", "post_norm", "post_rope")
_EXACT_PCA_MAX = 512  # exact eigh below this size; seeded randomized subspace iteration above
_MAX_CELLS = 1_000_000  # histogram cells (bins ** dims)


def auto_bins(n: int, dims: int) -> int:
    """Bins per PCA axis for about 10 of ``n`` points per cell: clip(floor((n / 10)^(1/dims)), 2, 64).

    Example:
        >>> auto_bins(1000, 2), auto_bins(1000, 1), auto_bins(5, 2)
        (10, 64, 2)
    """
    return int(min(64, max(2, math.floor((max(n, 0) / 10) ** (1 / dims) + 1e-9))))


# ----------------------------------------------------------------------------------------------------------
# MMD
# ----------------------------------------------------------------------------------------------------------


def subsample(x: Any, max_samples: int | None, seed: int = 0) -> torch.Tensor:
    """A seeded uniform subset of at most ``max_samples`` rows of ``x`` (original order kept), float64.

    Example:
        >>> import torch
        >>> subsample(torch.arange(10.0)[:, None], 3, seed=0).shape
        torch.Size([3, 1])
    """
    t = as_features(x, "features", min_rows=0)
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    if max_samples is None or t.shape[0] <= max_samples:
        return t
    perm = torch.randperm(t.shape[0], generator=torch.Generator().manual_seed(seed))
    return t[perm[:max_samples].sort().values.to(t.device)]


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ||a||^2 + ||b||^2 - 2 a.b in float64; clamped because rounding can make it slightly negative.
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def median_bandwidth(x: Any, y: Any | None = None) -> float:
    """Median-heuristic RBF bandwidth: the median pairwise Euclidean distance of the pooled rows.

    Over the distinct pairs (i < j) of ``x`` stacked on ``y``; the average of the two middle values
    for an even count. Falls back to the mean distance when the median is 0 (many repeated rows),
    and to 1.0 when all rows coincide.

    Example:
        >>> import torch
        >>> median_bandwidth(torch.tensor([[0.0], [1.0], [3.0]]))
        2.0
    """
    z = as_features(x, "x", min_rows=1)
    if y is not None:
        z = torch.cat([z, as_features(y, "y", min_rows=1).to(z.device)])
    if z.shape[0] < 2:
        raise ValueError("the median heuristic needs at least 2 points")
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    dist = _sq_dists(z, z)[iu[0], iu[1]].sqrt()
    h = float(np.median(dist.cpu().numpy()))
    if h <= 0:
        h = float(dist.mean())
    return h if h > 0 else 1.0


def _mmd2(x: torch.Tensor, y: torch.Tensor, h: float, unbiased: bool) -> float:
    return _mmd2_both(x, y, h)[0 if unbiased else 1]


def _mmd2_both(x: torch.Tensor, y: torch.Tensor, h: float) -> tuple[float, float]:
    """(unbiased U-statistic, biased V-statistic) of MMD^2 from one set of kernel matrices."""
    gamma = 1.0 / (2.0 * h * h)
    kxx = torch.exp(-gamma * _sq_dists(x, x))
    kyy = torch.exp(-gamma * _sq_dists(y, y))
    kxy = torch.exp(-gamma * _sq_dists(x, y))
    n, m = x.shape[0], y.shape[0]
    cross = 2.0 * kxy.mean()
    # The exact diagonal is exp(0) = 1; the U-statistic leaves it out.
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - cross), float(kxx.mean() + kyy.mean() - cross)


def mmd2_rbf(
    x: Any,
    y: Any,
    *,
    bandwidth: float | None = None,
    unbiased: bool = True,
    max_samples: int | None = 2000,
    seed: int = 0,
) -> float:
    """Squared maximum mean discrepancy of ``x`` [n, d] and ``y`` [m, d] with a Gaussian RBF kernel.

    k(a, b) = exp(-||a - b||^2 / (2 h^2)). Unbiased (default):

        MMD^2_u = sum_{i != j} k(x_i, x_j) / (n (n-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
                  - 2 sum_{i, j} k(x_i, y_j) / (n m)

    ``unbiased=False`` keeps the diagonal terms (divides by n^2, m^2). Computed in float64.

    Args:
        bandwidth: h; None = :func:`median_bandwidth` of the pooled (subsampled) rows.
        max_samples: at most this many rows per set, a seeded uniform subset (``seed`` for x,
            ``seed + 1`` for y); None = all rows (memory grows as (n + m)^2).

    Example:
        >>> import torch
        >>> x = torch.zeros(4, 2)
        >>> mmd2_rbf(x, x + 1.0, bandwidth=1.0)  # 1 + 1 - 2 exp(-1)
        1.2642411176571153
    """
    xs = subsample(x, max_samples, seed)
    ys = subsample(y, max_samples, seed + 1).to(xs.device)
    minimum = 2 if unbiased else 1
    for name, t in (("x", xs), ("y", ys)):
        if t.shape[0] < minimum:
            raise ValueError(f"mmd2_rbf: {name} needs at least {minimum} rows, got {t.shape[0]}")
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(f"mmd2_rbf: x has {xs.shape[1]} dims, y has {ys.shape[1]}")
    h = median_bandwidth(xs, ys) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    return _mmd2(xs, ys, h, unbiased)


# ----------------------------------------------------------------------------------------------------------
# Shared PCA projection and histogram JSD
# ----------------------------------------------------------------------------------------------------------


def _fix_signs(components: torch.Tensor) -> torch.Tensor:
    # Eigenvectors have no sign; make each one's largest-magnitude loading positive (deterministic).
    idx = components.abs().argmax(dim=1)
    signs = torch.sign(components.gather(1, idx[:, None]))
    return components * torch.where(signs == 0, 1.0, signs)


def pca_basis(x: Any, y: Any, dims: int = 2, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared PCA of two sets, weighted equally: (mean [d], components [dims, d], variances [dims]).

    The mean is (mean(x) + mean(y)) / 2 and the covariance that of the 50/50 mixture of the two
    sets, so the larger set does not choose the axes. Exact (``eigh``) when min(rows, d) <= 512,
    else a seeded randomized subspace iteration (10 extra directions, 8 power iterations), which
    recovers the leading components to rounding unless their eigenvalues nearly tie. Each
    component's largest-magnitude loading is positive.

    Example:
        >>> import torch
        >>> mean, comps, var = pca_basis(torch.randn(50, 6), torch.randn(40, 6), dims=2)
        >>> tuple(comps.shape)
        (2, 6)
    """
    xs = as_features(x, "x", min_rows=1)
    ys = as_features(y, "y", min_rows=1).to(xs.device)
    d = xs.shape[1]
    if ys.shape[1] != d:
        raise ValueError(f"x has {d} dims, y has {ys.shape[1]}")
    if not 1 <= dims <= d:
        raise ValueError(f"dims must be in 1..{d}, got {dims}")
    mean = 0.5 * (xs.mean(0) + ys.mean(0))
    a = torch.cat([(xs - mean) / math.sqrt(2 * xs.shape[0]), (ys - mean) / math.sqrt(2 * ys.shape[0])])
    if min(a.shape) <= _EXACT_PCA_MAX:
        if a.shape[0] < d:  # eigenvectors of A^T A from those of the smaller A A^T
            evals, u = torch.linalg.eigh(a @ a.T)
            evals, u = evals.flip(0)[:dims], u.flip(1)[:, :dims]
            comps = (a.T @ u) / evals.clamp_min(1e-300).sqrt()
        else:
            evals, v = torch.linalg.eigh(a.T @ a)
            evals, comps = evals.flip(0)[:dims], v.flip(1)[:, :dims]
    else:
        k = min(dims + 10, min(a.shape))
        gen = torch.Generator(device=a.device).manual_seed(seed)
        q = torch.randn(d, k, generator=gen, device=a.device, dtype=a.dtype)
        for _ in range(8):
            q, _r = torch.linalg.qr(a.T @ (a @ q))
        _u, s, vh = torch.linalg.svd(a @ q, full_matrices=False)
        evals, comps = (s * s)[:dims], (q @ vh.T)[:, :dims]
    comps = comps / comps.norm(dim=0, keepdim=True).clamp_min(1e-300)
    return mean, _fix_signs(comps.T.contiguous()), evals.clamp_min(0.0)


def pca_histograms(
    x: Any,
    y: Any,
    *,
    dims: int = 2,
    bins: int | None = None,
    clip_quantile: float = 0.01,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Joint histograms (counts) of ``x`` and ``y`` on their shared PCA projection, and the bin edges.

    Each of the ``dims`` components is split into ``bins`` equal bins (None: :func:`auto_bins` of the
    smaller set) spanning the pooled projections between the ``clip_quantile`` and
    ``1 - clip_quantile`` quantiles (0 = min to max); points outside are counted in the edge bins.
    Returns (counts_x, counts_y, edges), counts shaped [bins] * dims.

    Example:
        >>> import torch
        >>> hx, hy, edges = pca_histograms(torch.randn(100, 5), torch.randn(80, 5), dims=2, bins=4)
        >>> hx.shape, int(hx.sum()), int(hy.sum())
        ((4, 4), 100, 80)
    """
    if not 0 <= clip_quantile < 0.5:
        raise ValueError(f"clip_quantile must be in [0, 0.5), got {clip_quantile}")
    xs, ys = as_features(x, "x"), as_features(y, "y")
    if bins is None:
        bins = auto_bins(min(xs.shape[0], ys.shape[0]), dims)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if bins**dims > _MAX_CELLS:
        raise ValueError(f"bins ** dims = {bins}^{dims} cells is too many (max {_MAX_CELLS}); lower bins or dims")
    mean, comps, _ = pca_basis(xs, ys, dims, seed=seed)
    px = ((xs - mean) @ comps.T).cpu().numpy()
    py = ((ys.to(mean.device) - mean) @ comps.T).cpu().numpy()
    pooled = np.concatenate([px, py])
    lo = np.quantile(pooled, clip_quantile, axis=0)
    hi = np.quantile(pooled, 1.0 - clip_quantile, axis=0)
    flat = hi <= lo  # a constant projection: one bin around it
    lo, hi = np.where(flat, lo - 0.5, lo), np.where(flat, hi + 0.5, hi)
    edges = [np.linspace(lo[i], hi[i], bins + 1) for i in range(dims)]
    hx, _ = np.histogramdd(np.clip(px, lo, hi), bins=edges)
    hy, _ = np.histogramdd(np.clip(py, lo, hi), bins=edges)
    return hx, hy, edges


def jsd_histograms(p: Any, q: Any, *, base: float = 2.0) -> float:
    """Jensen-Shannon divergence of two histograms (any shape; counts or probabilities).

    Both are normalised to sum 1; JSD = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2,
    0 log 0 = 0, logarithm in ``base`` (2: bits, JSD in [0, 1]; e: nats, in [0, ln 2]). Equals
    ``scipy.spatial.distance.jensenshannon(p, q, base=base) ** 2``.

    Example:
        >>> jsd_histograms([1, 0], [0, 1])
        1.0
    """
    a = np.asarray(p, dtype=np.float64).ravel()
    b = np.asarray(q, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"histograms differ in size: {a.size} vs {b.size}")
    if (a < 0).any() or (b < 0).any() or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("histograms must be finite and non-negative")
    if a.sum() <= 0 or b.sum() <= 0:
        raise ValueError("a histogram is empty (sums to 0)")
    if not base > 1:
        raise ValueError(f"base must be > 1, got {base}")
    a, b = a / a.sum(), b / b.sum()
    m = 0.5 * (a + b)

    def kl(u: np.ndarray) -> float:
        nz = u > 0
        return float(np.sum(u[nz] * np.log(u[nz] / m[nz])))

    return max(0.0, 0.5 * (kl(a) + kl(b)) / math.log(base))


def jsd_pca(
    x: Any,
    y: Any,
    *,
    dims: int = 2,
    bins: int | None = None,
    base: float = 2.0,
    clip_quantile: float = 0.01,
    max_samples: int | None = 2000,
    seed: int = 0,
) -> float:
    """JSD of ``x`` and ``y`` over histograms of their shared PCA projection (see the module docstring).

    Rows are capped at ``max_samples`` per set (seeded, as :func:`mmd2_rbf`).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> jsd_pca(torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g) + 5) > 0.9
        True
    """
    xs = subsample(x, max_samples, seed)
    ys = subsample(y, max_samples, seed + 1)
    hx, hy, _ = pca_histograms(xs, ys, dims=dims, bins=bins, clip_quantile=clip_quantile, seed=seed)
    return jsd_histograms(hx, hy, base=base)


def _tsne_class() -> Any:
    try:
        from sklearn.manifold import TSNE
    except ImportError as err:
        raise ImportError(
            "tsne=True needs scikit-learn, which hf-normalign does not install by default: "
            'pip install "hf-normalign[tsne]"'
        ) from err
    return TSNE


def tsne_2d(x: Any, *, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """2-D t-SNE of the rows of ``x`` [n, d] with scikit-learn: ``TSNE(n_components=2, perplexity, init="pca",
    random_state=seed)``, other settings scikit-learn's defaults (Barnes-Hut, 1000 iterations).

    ``perplexity`` None = min(30, (n - 1) / 3) (scikit-learn needs it below n). The same ``seed`` and
    rows give the same points. ImportError naming ``pip install "hf-normalign[tsne]"`` without scikit-learn.

    Example:
        >>> import torch
        >>> tsne_2d(torch.randn(40, 5), seed=0).shape  # doctest: +SKIP
        (40, 2)
    """
    tsne = _tsne_class()
    rows = as_features(x, "x", min_rows=4).cpu().numpy()
    chosen = min(30.0, (rows.shape[0] - 1) / 3) if perplexity is None else float(perplexity)
    if not 0 < chosen < rows.shape[0]:
        raise ValueError(f"perplexity must be in (0, {rows.shape[0]}), got {perplexity}")
    return tsne(n_components=2, perplexity=chosen, init="pca", random_state=seed).fit_transform(rows)


# ----------------------------------------------------------------------------------------------------------
# Result and per-layer computation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class KeySpaceResult:
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

    _FLOAT_LISTS = (
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
    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (non-finite floats as strings); :meth:`from_dict` inverts it."""
        out = asdict(self)
        for key in self._FLOAT_LISTS:
            out[key] = json_floats(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeySpaceResult:
        kwargs = dict(data)
        for key in cls._FLOAT_LISTS:
            kwargs[key] = [float(v) for v in kwargs.get(key, [])]
        return cls(**kwargs)

    def format_table(self) -> str:
        head = (
            f"{'layer':>5}  {'MMD^2':>9}  {'MMD^2 V|V':>9}  {'MMD^2 T|T':>9}  {'JSD':>7}  {'JSD V|V':>7}  "
            f"{'JSD T|T':>7}  {'h':>8}"
        )
        lines = [head, "-" * len(head)]
        for i, layer in enumerate(self.layers):
            lines.append(
                f"{layer:>5}  {self.mmd2[i]:>9.4f}  {self.mmd2_vision_halves[i]:>9.4f}  "
                f"{self.mmd2_text_halves[i]:>9.4f}  {self.jsd[i]:>7.4f}  {self.jsd_vision_halves[i]:>7.4f}  "
                f"{self.jsd_text_halves[i]:>7.4f}  {self.bandwidth[i]:>8.4g}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"KeySpaceResult ({self.num_samples} samples; V|V, T|T = random halves)\n{self.format_table()}"


def _halves(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    half = x.shape[0] // 2
    return x[perm[:half]], x[perm[half : 2 * half]]


def _layer_gap(
    v: torch.Tensor, t: torch.Tensor, layer: int, opts: dict[str, Any], want_scatter: bool
) -> dict[str, Any]:
    """All numbers of one layer from (already capped) vision keys ``v`` and text keys ``t``."""
    for name, x in (("vision", v), ("text", t)):
        if x.shape[0] < 4:
            raise ValueError(
                f"layer {layer}: {x.shape[0]} {name} keys; the key-space gap needs at least 4 per modality "
                "(2 per random half for the intra-modal baseline)"
            )
    seed, unbiased, dims = opts["seed"], opts["unbiased"], opts["pca_dims"]
    h = median_bandwidth(v, t) if opts["bandwidth"] is None else float(opts["bandwidth"])
    gen = torch.Generator().manual_seed(seed + 7919 * layer)
    v1, v2 = _halves(v, gen)
    t1, t2 = _halves(t, gen)
    bins = auto_bins(min(v1.shape[0], t1.shape[0]), dims) if opts["bins"] is None else opts["bins"]
    jsd = dict(dims=dims, bins=bins, clip_quantile=opts["clip_quantile"], seed=seed)
    base = opts["jsd_base"]
    mmd2_u, mmd2_b = _mmd2_both(v, t, h)
    out = {
        "mmd2": mmd2_u if unbiased else mmd2_b,
        "mmd2_unbiased": mmd2_u,
        "mmd2_biased": mmd2_b,
        "mmd": math.sqrt(max(mmd2_b, 0.0)),
        "mmd2_vision_halves": _mmd2(v1, v2, h, unbiased),
        "mmd2_text_halves": _mmd2(t1, t2, h, unbiased),
        "jsd": jsd_histograms(*pca_histograms(v, t, **jsd)[:2], base=base),
        "jsd_vision_halves": jsd_histograms(*pca_histograms(v1, v2, **jsd)[:2], base=base),
        "jsd_text_halves": jsd_histograms(*pca_histograms(t1, t2, **jsd)[:2], base=base),
        "bandwidth": h,
        "jsd_bins": bins,
    }
    if want_scatter:
        mean, comps, var = pca_basis(v, t, min(2, v.shape[1]), seed=seed)
        n = opts["scatter_points"]
        pick = {
            name: x[torch.randperm(x.shape[0], generator=gen)[:n].sort().values.to(x.device)]
            for name, x in (("vision", v), ("text", t))
        }
        out["scatter"] = {
            name: [[float(c) for c in row] for row in ((x - mean) @ comps.T).cpu().tolist()] for name, x in pick.items()
        } | {"variance": [float(s) for s in var]}
        if opts["tsne"]:  # one embedding of both modalities, so their points share the map
            points = tsne_2d(torch.cat([pick["vision"], pick["text"]]), seed=seed).tolist()
            nv = pick["vision"].shape[0]
            out["scatter"]["tsne"] = {"vision": points[:nv], "text": points[nv:]}
    return out


def _default_scatter_layers(layers: Sequence[int]) -> list[int]:
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})


def _settings(opts: dict[str, Any]) -> dict[str, Any]:
    return {
        "kernel": "rbf: exp(-||a-b||^2 / (2 h^2))",
        "bandwidth": "median heuristic (pooled vision+text, per layer)"
        if opts["bandwidth"] is None
        else float(opts["bandwidth"]),
        "estimator": "unbiased U-statistic" if opts["unbiased"] else "biased V-statistic",
        "max_samples": opts["max_samples"],
        "intra_modal_baseline": "random halves of each modality, cross-modal bandwidth",
        "jsd": f"joint histogram of a shared equal-weight PCA projection, log base {opts['jsd_base']:g}",
        "pca_dims": opts["pca_dims"],
        "bins": "auto: about 10 points per cell of a half of the smaller modality"
        if opts["bins"] is None
        else opts["bins"],
        "clip_quantile": opts["clip_quantile"],
        "jsd_base": opts["jsd_base"],
        "scatter_points": opts["scatter_points"],
        "tsne": "2-D t-SNE of the scatter points (scikit-learn, init pca, perplexity min(30, (n-1)/3))"
        if opts["tsne"]
        else False,
        "seed": opts["seed"],
    }


def _options(
    bandwidth, unbiased, max_samples, pca_dims, bins, jsd_base, clip_quantile, scatter_points, seed, tsne=False
):
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0 or None, got {bandwidth}")
    if max_samples is not None and max_samples < 4:
        raise ValueError(f"max_samples must be >= 4 or None, got {max_samples}")
    if pca_dims < 1 or (bins is not None and (bins < 1 or bins**pca_dims > _MAX_CELLS)):
        raise ValueError(f"need pca_dims >= 1, bins >= 1 and bins ** pca_dims <= {_MAX_CELLS}")
    if not jsd_base > 1:
        raise ValueError(f"jsd_base must be > 1, got {jsd_base}")
    if not 0 <= clip_quantile < 0.5:
        raise ValueError(f"clip_quantile must be in [0, 0.5), got {clip_quantile}")
    if tsne:
        _tsne_class()  # the missing extra is reported before any work
    return dict(
        bandwidth=bandwidth,
        unbiased=unbiased,
        max_samples=max_samples,
        pca_dims=pca_dims,
        bins=bins,
        jsd_base=jsd_base,
        clip_quantile=clip_quantile,
        scatter_points=scatter_points,
        seed=seed,
        tsne=tsne,
    )


def _result(
    per_layer: list[dict[str, Any]],
    layers: list[int],
    seen: list[tuple[int, int]],
    used: list[tuple[int, int]],
    num_samples: int | None,
    settings: dict[str, Any],
) -> KeySpaceResult:
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
    opts = _options(
        bandwidth, unbiased, max_samples, pca_dims, bins, jsd_base, clip_quantile, scatter_points, seed, tsne
    )
    scatter = set(_default_scatter_layers(numbers) if scatter_layers is None else scatter_layers)
    per_layer, seen, used = [], [], []
    for layer, v_raw, t_raw in zip(numbers, vision_keys, text_keys, strict=True):
        v = as_features(v_raw, f"vision keys of layer {layer}", min_rows=0)
        t = as_features(t_raw, f"text keys of layer {layer}", min_rows=0).to(v.device)
        vs, ts = subsample(v, max_samples, seed), subsample(t, max_samples, seed + 1)
        per_layer.append(_layer_gap(vs, ts, layer, opts, layer in scatter))
        seen.append((v.shape[0], t.shape[0]))
        used.append((vs.shape[0], ts.shape[0]))
    return _result(per_layer, numbers, seen, used, num_samples, _settings(opts))


# ----------------------------------------------------------------------------------------------------------
# Model level
# ----------------------------------------------------------------------------------------------------------


class _Reservoir:
    """A seeded uniform sample of at most ``k`` rows from a stream of batches (bottom-k of random keys).

    Every row gets a uniform random priority; the ``k`` smallest are kept. The same priorities serve
    every layer, so the same tokens are kept at every layer.
    """

    def __init__(self, k: int | None, seed: int) -> None:
        self.k, self.gen = k, torch.Generator().manual_seed(seed)
        self.priority = torch.empty(0)
        self.rows: dict[int, torch.Tensor] = {}
        self.seen = 0

    def update(self, feats: dict[int, torch.Tensor]) -> None:
        n = next(iter(feats.values())).shape[0]
        self.seen += n
        priority = torch.cat([self.priority, torch.rand(n, generator=self.gen)])
        keep = None
        if self.k is not None and priority.shape[0] > self.k:
            keep = priority.topk(self.k, largest=False).indices.sort().values
            priority = priority[keep]
        self.priority = priority
        for layer, x in feats.items():
            x = x.detach()
            joined = torch.cat([self.rows[layer], x.to(self.rows[layer].device)]) if layer in self.rows else x
            self.rows[layer] = joined[keep.to(joined.device)] if keep is not None else joined


class _KeySpace:
    """Turns captured ``k_proj`` rows into the keys of ``space`` ("post_norm" or "post_rope").

    Forward pre-hooks on the selected attention modules record the dtype of the hidden states each one
    receives and its ``position_embeddings`` (nothing is changed). After the batch, each row goes back to
    that dtype and through the attention's own ``k_norm`` (when it has one) and, for "post_rope", the
    ``apply_rotary_pos_emb`` of the attention's transformers module at the row's (batch row, position):
    the same operations attention applies, on the selected rows only.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], samples: Sequence[Any], space: str) -> None:
        from ..registry import get_spec
        from .capture import vision_token_ids

        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        decoder = get_spec(base).decoder_layers(base)
        self.space = space
        self.attentions = {k: decoder[k - 1].self_attn for k in layers}
        self.normed = [k for k, attn in self.attentions.items() if getattr(attn, "k_norm", None) is not None]
        self.seen: dict[int, tuple[torch.dtype, Any]] = {}
        ids = torch.tensor(vision_token_ids(model))
        # Positions of the vision / text rows of every sample, in the order capture yields them.
        self.vision_pos = [
            (torch.isin(s.input_ids, ids) & s.inputs.get("attention_mask", torch.ones(1, 1))[0].bool())
            .nonzero()
            .squeeze(1)
            for s in samples
        ]
        self.text_pos = [s.text_mask.nonzero().squeeze(1) for s in samples]

    def describe(self) -> str:
        """What the keys are, for ``settings["keys"]``."""
        if not self.normed:
            norm = "this model's attention has no k_norm, so nothing is normalised"
        elif len(self.normed) == len(self.attentions):
            norm = "after self_attn.k_norm (per head)"
        else:
            norm = f"after self_attn.k_norm on layers {self.normed} (the others have none)"
        if self.space == "post_norm":
            what = "equal to the k_proj output" if not self.normed else "k_proj output"
            return f"post_norm: {what}, {norm}, before RoPE; all KV heads concatenated"
        return (
            f"post_rope: k_proj output, {norm}, then RoPE by the model's own apply_rotary_pos_emb with the "
            "position embeddings attention receives (the keys attention compares); all KV heads concatenated"
        )

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        def record(layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.seen[layer] = (hidden.dtype, kwargs.get("position_embeddings", args[1] if len(args) > 1 else None))

        handles = [
            attn.register_forward_pre_hook(lambda m, a, kw, layer=layer: record(layer, m, a, kw), with_kwargs=True)
            for layer, attn in self.attentions.items()
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _positions(self, samples: torch.Tensor, index: torch.Tensor, first: int, table: list[torch.Tensor]):
        # Capture pads on the right (its default), so a row keeps its unpadded position.
        pos = torch.empty_like(index)
        for s in samples.unique().tolist():
            rows = samples == s
            pos[rows] = table[s][index[rows]]
        return samples - first, pos

    def _rows(self, layer: int, rows: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        attn = self.attentions[layer]
        dtype, position_embeddings = self.seen[layer]
        head_dim = getattr(attn, "head_dim", None) or attn.config.head_dim
        k = rows.to(dtype).view(rows.shape[0], -1, head_dim)  # [rows, kv heads, head_dim]
        if layer in self.normed:
            k = attn.k_norm(k.to(attn.k_norm.weight.device))
        if self.space == "post_rope":
            if position_embeddings is None:
                raise ValueError(f"keys='post_rope': decoder layer {layer}'s attention received no position_embeddings")
            rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
            if rope is None:
                raise ValueError(f"keys='post_rope': {type(attn).__module__} has no apply_rotary_pos_emb")
            cos, sin = position_embeddings
            b, pos = (t.to(cos.device) for t in where)
            b = b * (cos.shape[0] > 1)  # cos/sin of [1, L, dim] serve every batch row
            # [rows, dim] unsqueezed at dim 1 broadcasts over the heads, as [B, 1, L, dim] does in attention.
            _, k = rope(k.to(cos.device), k.to(cos.device), cos[b, pos], sin[b, pos], unsqueeze_dim=1)
        return k.reshape(rows.shape[0], -1).to(rows.dtype)

    def __call__(self, batch: Any) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """(vision keys, text keys) of a ``CaptureBatch`` in this key space."""
        first = batch.sample_indices[0]
        vision = self._positions(batch.vision_sample, batch.vision_patch, first, self.vision_pos)
        text = self._positions(batch.text_sample, batch.text_token, first, self.text_pos)
        with torch.inference_mode():
            return (
                {k: self._rows(k, v, vision) for k, v in batch.vision_keys.items()},
                {k: self._rows(k, t, text) for k, t in batch.text_keys.items()},
            )


def key_space_gap(
    model: nn.Module,
    processor: Any,
    probe: Any = None,
    layers: Iterable[int] | None = None,
    *,
    num_samples: int | None = 100,
    seed: int = 0,
    batch_size: int = 8,
    max_samples: int | None = 2000,
    bandwidth: float | None = None,
    unbiased: bool = True,
    pca_dims: int = 2,
    bins: int | None = None,
    jsd_base: float = 2.0,
    clip_quantile: float = 0.01,
    scatter_layers: Iterable[int] | None = None,
    scatter_points: int = 300,
    tsne: bool = False,
    device: str | torch.device | None = None,
    prompt: str | None = None,
    keys: str = "k_proj",
    progress: bool = True,
) -> KeySpaceResult:
    """Key-space gap of ``model`` over a probe set (default: the built-in probe).

    Args:
        model: a supported ``...ForConditionalGeneration`` (GQA models included).
        processor: its processor (not needed when ``probe`` holds encoded samples).
        probe: a :class:`~.probe.Probe`, ``(image, text)`` pairs, or ``capture.EncodedSample`` list.
        layers: decoder layers 1..K (negative counts from the end); default all. Layer 0 (the LLM
            input) has no keys.
        num_samples, seed: probe pairs used (a seeded subset when the probe is larger).
        batch_size: samples per forward pass.
        max_samples: keys kept per modality and layer, a seeded uniform sample of the whole probe
            (a streaming reservoir, so memory stays bounded); None keeps all.
        bandwidth, unbiased, pca_dims, bins, jsd_base, clip_quantile: see the module docstring.
        scatter_layers / scatter_points: layers (default first, middle, last) and points per modality
            of the 2-D PCA scatter stored in the result.
        tsne: also a 2-D t-SNE of the scatter points (:func:`tsne_2d`; ``pip install "hf-normalign[tsne]"``).
        device, prompt: passed to :func:`~.capture.capture`.
        keys: the key space, ``"k_proj"``, ``"post_norm"`` or ``"post_rope"`` (module docstring);
            ``settings["keys"]`` states what was taken for this model.
        progress: tqdm progress bars.

    Example:
        >>> from hf_normalign.testing import tiny_model, tiny_processor
        >>> r = key_space_gap(tiny_model("qwen2_vl"), tiny_processor("qwen2_vl"), num_samples=4, progress=False)
        >>> r.layers, len(r.mmd2)
        ([1, 2], 2)
    """
    from .capture import capture, resolve_layers

    opts = _options(
        bandwidth, unbiased, max_samples, pca_dims, bins, jsd_base, clip_quantile, scatter_points, seed, tsne
    )
    if keys not in KEY_SPACES:
        raise ValueError(f"keys must be one of {', '.join(KEY_SPACES)}; got {keys!r}")
    selected = resolve_layers(model, layers)
    if 0 in selected:
        raise ValueError("layer 0 is the LLM input and has no attention keys; choose decoder layers 1..K")
    samples = encoded_probe(processor, probe, num_samples, seed, prompt, progress)
    space = None if keys == "k_proj" else _KeySpace(model, selected, samples, keys)
    vision, text = _Reservoir(max_samples, seed), _Reservoir(max_samples, seed + 1)
    with space.hooks() if space is not None else contextlib.nullcontext():
        for batch in capture(
            model,
            processor,
            samples,
            layers=selected,
            capture_keys=True,
            batch_size=batch_size,
            device=device,
            progress=progress,
        ):
            vision_keys, text_keys = (batch.vision_keys, batch.text_keys) if space is None else space(batch)
            vision.update(vision_keys)
            text.update(text_keys)
    if text.seen == 0:
        raise ValueError("no text-passage tokens in the probe: the key-space gap needs both modalities")
    scatter = set(_default_scatter_layers(selected) if scatter_layers is None else scatter_layers)
    per_layer = [
        _layer_gap(vision.rows[k].double(), text.rows[k].double().to(vision.rows[k].device), k, opts, k in scatter)
        for k in selected
    ]
    used = [(vision.rows[k].shape[0], text.rows[k].shape[0]) for k in selected]
    settings = _settings(opts) | {
        "key_space": keys,
        "keys": "self_attn.k_proj output (before any k_norm and RoPE), all KV heads concatenated"
        if space is None
        else space.describe(),
        "probe": probe_description(probe, len(samples), seed),
        "batch_size": batch_size,
    }
    return _result(per_layer, selected, [(vision.seen, text.seen)] * len(selected), used, len(samples), settings)
