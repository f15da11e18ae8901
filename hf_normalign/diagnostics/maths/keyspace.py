"""The key-space gap measures on plain tensors: the shared PCA projection, histogram JSD and t-SNE, with MMD from
:mod:`.mmd`; the choices behind the numbers (:class:`KeySpaceOptions`) and all numbers of one layer
(:func:`layer_gap`). The model-level metric: :mod:`..metrics.keyspace`.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> v, t = torch.randn(200, 6, generator=g).double() + 1.0, torch.randn(150, 6, generator=g).double()
    >>> numbers = layer_gap(v, t, 1, KeySpaceOptions(bins=4), want_scatter=False)
    >>> numbers["mmd2"] > numbers["mmd2_text_halves"], numbers["jsd_bins"]
    (True, 4)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .features import as_features
from .mmd import median_bandwidth, mmd2, mmd2_both, random_halves, subsample

__all__ = [
    "MAX_CELLS",
    "KeySpaceOptions",
    "auto_bins",
    "jsd_histograms",
    "jsd_pca",
    "layer_gap",
    "pca_basis",
    "pca_histograms",
    "tsne_2d",
    "tsne_class",
]


_EXACT_PCA_MAX = 512  # exact eigh below this size; seeded randomized subspace iteration above


MAX_CELLS = 1_000_000  # histogram cells (bins ** dims)


def auto_bins(n: int, dims: int) -> int:
    """Bins per PCA axis for about 10 of ``n`` points per cell: clip(floor((n / 10)^(1/dims)), 2, 64).

    Example:
        >>> auto_bins(1000, 2), auto_bins(1000, 1), auto_bins(5, 2)
        (10, 64, 2)
    """
    return int(min(64, max(2, math.floor((max(n, 0) / 10) ** (1 / dims) + 1e-9))))


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
    if bins**dims > MAX_CELLS:
        raise ValueError(f"bins ** dims = {bins}^{dims} cells is too many (max {MAX_CELLS}); lower bins or dims")
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


def tsne_class() -> Any:
    """scikit-learn's ``TSNE``; ImportError naming the extra to install when it is missing."""
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
    tsne = tsne_class()
    rows = as_features(x, "x", min_rows=4).cpu().numpy()
    chosen = min(30.0, (rows.shape[0] - 1) / 3) if perplexity is None else float(perplexity)
    if not 0 < chosen < rows.shape[0]:
        raise ValueError(f"perplexity must be in (0, {rows.shape[0]}), got {perplexity}")
    return tsne(n_components=2, perplexity=chosen, init="pca", random_state=seed).fit_transform(rows)


@dataclass(frozen=True)
class KeySpaceOptions:
    """The choices behind the key-space numbers (module docstring), validated on construction.

    Example:
        >>> KeySpaceOptions(jsd_base=1.0)
        Traceback (most recent call last):
        ...
        ValueError: jsd_base must be > 1, got 1.0
    """

    bandwidth: float | None = None
    unbiased: bool = True
    max_samples: int | None = 2000
    pca_dims: int = 2
    bins: int | None = None
    jsd_base: float = 2.0
    clip_quantile: float = 0.01
    scatter_layers: tuple[int, ...] | None = None
    scatter_points: int = 300
    seed: int = 0
    tsne: bool = False

    def __post_init__(self) -> None:
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0 or None, got {self.bandwidth}")
        if self.max_samples is not None and self.max_samples < 4:
            raise ValueError(f"max_samples must be >= 4 or None, got {self.max_samples}")
        if self.pca_dims < 1 or (self.bins is not None and (self.bins < 1 or self.bins**self.pca_dims > MAX_CELLS)):
            raise ValueError(f"need pca_dims >= 1, bins >= 1 and bins ** pca_dims <= {MAX_CELLS}")
        if not self.jsd_base > 1:
            raise ValueError(f"jsd_base must be > 1, got {self.jsd_base}")
        if not 0 <= self.clip_quantile < 0.5:
            raise ValueError(f"clip_quantile must be in [0, 0.5), got {self.clip_quantile}")
        if self.scatter_layers is not None:
            object.__setattr__(self, "scatter_layers", tuple(int(i) for i in self.scatter_layers))
        if self.tsne:
            tsne_class()  # the missing extra is reported before any work

    def scatter_for(self, layers: Sequence[int]) -> set[int]:
        """The layers that get scatter points: ``scatter_layers``, default the first, middle and last."""
        if self.scatter_layers is not None:
            return set(self.scatter_layers)
        return {layers[0], layers[len(layers) // 2], layers[-1]}

    def settings(self) -> dict[str, Any]:
        """How the numbers were computed, for ``KeySpaceResult.settings``."""
        return {
            "kernel": "rbf: exp(-||a-b||^2 / (2 h^2))",
            "bandwidth": "median heuristic (pooled vision+text, per layer)"
            if self.bandwidth is None
            else float(self.bandwidth),
            "estimator": "unbiased U-statistic" if self.unbiased else "biased V-statistic",
            "max_samples": self.max_samples,
            "intra_modal_baseline": "random halves of each modality, cross-modal bandwidth",
            "jsd": f"joint histogram of a shared equal-weight PCA projection, log base {self.jsd_base:g}",
            "pca_dims": self.pca_dims,
            "bins": "auto: about 10 points per cell of a half of the smaller modality"
            if self.bins is None
            else self.bins,
            "clip_quantile": self.clip_quantile,
            "jsd_base": self.jsd_base,
            "scatter_points": self.scatter_points,
            "tsne": "2-D t-SNE of the scatter points (scikit-learn, init pca, perplexity min(30, (n-1)/3))"
            if self.tsne
            else False,
            "seed": self.seed,
        }


def layer_gap(
    v: torch.Tensor, t: torch.Tensor, layer: int, opts: KeySpaceOptions, want_scatter: bool
) -> dict[str, Any]:
    """All numbers of one layer from (already capped) float64 vision keys ``v`` and text keys ``t``."""
    for name, x in (("vision", v), ("text", t)):
        if x.shape[0] < 4:
            raise ValueError(
                f"layer {layer}: {x.shape[0]} {name} keys; the key-space gap needs at least 4 per modality "
                "(2 per random half for the intra-modal baseline)"
            )
    seed, unbiased, dims = opts.seed, opts.unbiased, opts.pca_dims
    h = median_bandwidth(v, t) if opts.bandwidth is None else float(opts.bandwidth)
    gen = torch.Generator().manual_seed(seed + 7919 * layer)
    v1, v2 = random_halves(v, gen)
    t1, t2 = random_halves(t, gen)
    bins = auto_bins(min(v1.shape[0], t1.shape[0]), dims) if opts.bins is None else opts.bins
    jsd = dict(dims=dims, bins=bins, clip_quantile=opts.clip_quantile, seed=seed)
    base = opts.jsd_base
    mmd2_u, mmd2_b = mmd2_both(v, t, h)
    out = {
        "mmd2": mmd2_u if unbiased else mmd2_b,
        "mmd2_unbiased": mmd2_u,
        "mmd2_biased": mmd2_b,
        "mmd": math.sqrt(max(mmd2_b, 0.0)),
        "mmd2_vision_halves": mmd2(v1, v2, h, unbiased),
        "mmd2_text_halves": mmd2(t1, t2, h, unbiased),
        "jsd": jsd_histograms(*pca_histograms(v, t, **jsd)[:2], base=base),
        "jsd_vision_halves": jsd_histograms(*pca_histograms(v1, v2, **jsd)[:2], base=base),
        "jsd_text_halves": jsd_histograms(*pca_histograms(t1, t2, **jsd)[:2], base=base),
        "bandwidth": h,
        "jsd_bins": bins,
    }
    if want_scatter:
        mean, comps, var = pca_basis(v, t, min(2, v.shape[1]), seed=seed)
        n = opts.scatter_points
        pick = {
            name: x[torch.randperm(x.shape[0], generator=gen)[:n].sort().values.to(x.device)]
            for name, x in (("vision", v), ("text", t))
        }
        out["scatter"] = {
            name: [[float(c) for c in row] for row in ((x - mean) @ comps.T).cpu().tolist()] for name, x in pick.items()
        } | {"variance": [float(s) for s in var]}
        if opts.tsne:  # one embedding of both modalities, so their points share the map
            points = tsne_2d(torch.cat([pick["vision"], pick["text"]]), seed=seed).tolist()
            nv = pick["vision"].shape[0]
            out["scatter"]["tsne"] = {"vision": points[:nv], "text": points[nv:]}
    return out
