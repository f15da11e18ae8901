"""Figures of the diagnostics, one model or several overlaid (matplotlib, Agg backend).

Each function takes ``{model name: result}`` and returns a ``matplotlib.figure.Figure``; colours
follow the order of the names, so a model has the same colour in every figure. Vision is drawn
solid, text dashed, intra-modal baselines dotted.

Example:
    >>> import torch
    >>> from hf_normalign.diagnostics.profile import profile_from_features
    >>> prof = profile_from_features([torch.randn(20, 4) * 9 for _ in range(3)], [torch.randn(10, 4)] * 3)
    >>> fig = plot_norms({"base": prof})
    >>> fig.savefig("/tmp/norms.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "plot_degradation",
    "plot_key_gap",
    "plot_key_scatter",
    "plot_mir",
    "plot_norms",
    "plot_update_rate",
]

_VISION, _TEXT, _BASELINE = "-", "--", ":"


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # an optional dependency: pip install "hf-normalign[plots]"
        raise ImportError("the report plots need matplotlib: pip install 'hf-normalign[plots]'") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _colors(names: list[str]) -> dict[str, Any]:
    plt = _plt()
    cycle = plt.get_cmap("tab10")
    return {name: cycle(i % 10) for i, name in enumerate(names)}


def _figure(ncols: int, nrows: int = 1, width: float = 5.2, height: float = 3.6) -> tuple[Any, list[Any]]:
    plt = _plt()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, layout="constrained")
    return fig, [ax for row in axes for ax in row]


def _finish(ax: Any, title: str, xlabel: str, ylabel: str, handles: list[Any] | None = None) -> None:
    """Titles, integer layer ticks, and the legend (``handles``, else the labelled lines)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if handles is not None:
        ax.legend(handles=handles, fontsize=8, frameon=False)
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, frameon=False)


def _legend(colors: Mapping[str, Any], styles: Mapping[str, str]) -> list[Any]:
    """A compact legend: one entry per model colour, one per line style (not one per line)."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=c, lw=2, label=m) for m, c in colors.items()] + [
        Line2D([], [], color="grey", ls=ls, label=label) for label, ls in styles.items()
    ]


def _positive(values: list[float]) -> bool:
    return all(v > 0 and math.isfinite(v) for v in values)


def plot_norms(profiles: Mapping[str, Any]) -> Any:
    """Mean L2 norm per layer of vision (solid, ± std band) and text (dashed) tokens, and their ratio."""
    fig, (ax, ax_ratio) = _figure(2)
    colors = _colors(list(profiles))
    log = True
    for name, p in profiles.items():
        c = colors[name]
        for mean, std, style in (
            (p.vision_norm_mean, p.vision_norm_std, _VISION),
            (p.text_norm_mean, p.text_norm_std, _TEXT),
        ):
            ax.plot(p.layers, mean, style, color=c, marker="o", ms=3)
            lo = [m - (s if math.isfinite(s) else 0.0) for m, s in zip(mean, std, strict=True)]
            hi = [m + (s if math.isfinite(s) else 0.0) for m, s in zip(mean, std, strict=True)]
            ax.fill_between(p.layers, lo, hi, color=c, alpha=0.12, linewidth=0)
            log = log and _positive(mean)
        ax_ratio.plot(p.layers, p.norm_ratio, color=c, marker="o", ms=3, label=name)
    if log:
        ax.set_yscale("log")
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    if all(_positive(p.norm_ratio) for p in profiles.values()):
        ax_ratio.set_yscale("log")
    _finish(
        ax,
        "Token L2 norm (mean ± std)",
        "layer (0 = LLM input)",
        "L2 norm",
        _legend(colors, {"vision": _VISION, "text": _TEXT}),
    )
    _finish(ax_ratio, "Norm ratio vision / text", "layer (0 = LLM input)", "ratio")
    return fig


def plot_update_rate(profiles: Mapping[str, Any]) -> Any:
    """Adjacent-layer cosine cos(h_l, h_{l+1}) per modality: near 1 = the layer barely moves the token."""
    fig, (ax,) = _figure(1, width=7.0)
    colors = _colors(list(profiles))
    for name, p in profiles.items():
        ax.plot(p.update_layers, p.vision_update_cos, _VISION, color=colors[name], marker="o", ms=3)
        ax.plot(p.update_layers, p.text_update_cos, _TEXT, color=colors[name], marker="o", ms=3)
    _finish(
        ax,
        "Update rate: mean cos(h_l, h_l+1)",
        "decoder layer l + 1",
        "cosine similarity",
        _legend(colors, {"vision": _VISION, "text": _TEXT}),
    )
    return fig


def plot_mir(mirs: Mapping[str, Any]) -> Any:
    """Per-layer FID between vision and text tokens, the MIR in the legend."""
    fig, (ax,) = _figure(1, width=7.0)
    colors = _colors(list(mirs))
    log = True
    for name, r in mirs.items():
        ax.plot(r.layers, r.per_layer, color=colors[name], marker="o", ms=3, label=f"{name} (MIR {r.mir:.3f})")
        log = log and _positive(r.per_layer)
    if log:
        ax.set_yscale("log")
    _finish(ax, "Per-layer FID (vision vs text), MIR = log10 sum", "layer", "FID")
    return fig


def plot_key_gap(results: Mapping[str, Any]) -> Any:
    """Key-space MMD^2 and JSD per layer, cross-modal (solid) against the intra-modal halves (dotted)."""
    fig, (ax_mmd, ax_jsd) = _figure(2)
    colors = _colors(list(results))
    styles = {"vision vs text": _VISION, "vision halves": _BASELINE, "text halves": _TEXT}
    for name, r in results.items():
        c = colors[name]
        for ax, cross, v_halves, t_halves in (
            (ax_mmd, r.mmd2, r.mmd2_vision_halves, r.mmd2_text_halves),
            (ax_jsd, r.jsd, r.jsd_vision_halves, r.jsd_text_halves),
        ):
            ax.plot(r.layers, cross, _VISION, color=c, marker="o", ms=3)
            ax.plot(r.layers, v_halves, _BASELINE, color=c)
            ax.plot(r.layers, t_halves, _TEXT, color=c, alpha=0.6)
    _finish(ax_mmd, "Attention keys: MMD² (RBF)", "decoder layer", "MMD²", _legend(colors, styles))
    _finish(ax_jsd, "Attention keys: JSD of PCA histograms", "decoder layer", "JSD", _legend(colors, styles))
    return fig


def plot_key_scatter(results: Mapping[str, Any]) -> Any:
    """2-D shared-PCA scatter of vision and text keys: one row per model, one column per stored layer."""
    names = list(results)
    ncols = max((len(r.scatter) for r in results.values()), default=1) or 1
    fig, axes = _figure(ncols, nrows=len(names), width=3.6, height=3.3)
    for row, name in enumerate(names):
        r = results[name]
        layers = sorted(r.scatter, key=int)
        for col in range(ncols):
            ax = axes[row * ncols + col]
            if col >= len(layers):
                ax.axis("off")
                continue
            pts = r.scatter[layers[col]]
            for kind, color in (("text", "tab:blue"), ("vision", "tab:orange")):
                xy = pts[kind]
                ax.scatter(
                    [p[0] for p in xy],
                    [p[1] if len(p) > 1 else 0.0 for p in xy],
                    s=6,
                    alpha=0.5,
                    color=color,
                    label=kind,
                    linewidths=0,
                )
            ax.set_title(f"{name}: layer {layers[col]}", fontsize=10)
            ax.set_xlabel("PC 1")
            ax.set_ylabel("PC 2")
            ax.legend(fontsize=7, frameon=False, markerscale=2)
    return fig


def plot_degradation(results: Mapping[str, Any]) -> Any:
    """Effective dimension, |correlation|, patch contrast ratio and linear-probe accuracy per layer."""
    fig, axes = _figure(2, nrows=2, width=5.0, height=3.3)
    colors = _colors(list(results))
    panels = (
        ("effective_dim", "PCA effective dimension (participation ratio)", "PR"),
        ("offdiag_corr", "Mean |off-diagonal correlation|", "|r|"),
        ("contrast_ratio", "Patch contrast cohesion/coupling", "ratio"),
        ("probe_accuracy", "Linear-probe accuracy (CV)", "accuracy"),
    )
    for ax, (key, title, ylabel) in zip(axes, panels, strict=True):
        drawn = False
        for name, r in results.items():
            values = getattr(r, key)
            if values is None:
                continue
            ax.plot(r.layers, values, color=colors[name], marker="o", ms=3, label=name)
            if key == "probe_accuracy" and r.probe_chance is not None:
                ax.axhline(r.probe_chance, color=colors[name], ls=_BASELINE, lw=1)
            drawn = True
        if key == "contrast_ratio" and drawn:
            ax.axhline(1.0, color="grey", lw=0.8)
        if not drawn:
            ax.text(
                0.5,
                0.5,
                "not measured\n(no labels in the probe)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
        _finish(ax, title, "layer (0 = LLM input)", ylabel)
    return fig
