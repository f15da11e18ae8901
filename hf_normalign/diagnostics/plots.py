"""Figures of the diagnostics, one model or several overlaid (matplotlib, Agg backend), and the plot
helpers both HTML reports share.

Each ``plot_*`` function takes ``{model name: result}`` and returns a ``matplotlib.figure.Figure``. Every
model keeps one look in every figure (:func:`variant_styles`): a colour, a marker and a line width that
shrinks with the drawing order, so curves that coincide stay visible as nested stripes and markers.
Vision is drawn solid, text dashed, intra-modal baselines dotted. Legends sit below the axes, never
over the data. :func:`coinciding` names the models whose curves coincide (the reports say so in the
caption).

Public helpers (used by :mod:`hf_normalign.diagnostics.report` and :mod:`hf_normalign.demo.report`):
:func:`pyplot`, :func:`variant_styles`, :func:`figure`, :func:`finish`, :func:`plain_log_axis`,
:func:`png_bytes`, :func:`coinciding`.

Example:
    >>> import torch
    >>> from hf_normalign.diagnostics.metrics.profile import profile_from_features
    >>> prof = profile_from_features([torch.randn(20, 4) * 9 for _ in range(3)], [torch.randn(10, 4)] * 3)
    >>> fig = plot_norms({"base": prof})
    >>> len(png_bytes(fig)) > 1000
    True
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..persistence.staging import write_file_atomically

__all__ = [
    "DPI",
    "LAYER_AXIS",
    "coinciding",
    "figure",
    "finish",
    "plain_log_axis",
    "plot_degradation",
    "plot_key_gap",
    "plot_key_scatter",
    "plot_mir",
    "plot_norms",
    "plot_update_rate",
    "png_bytes",
    "pyplot",
    "variant_styles",
]

DPI = 220  # PNGs are written at 2x and shown at half their pixel size: sharp on dense screens
_VISION, _TEXT, _BASELINE = "-", "--", ":"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
_DASHES = ("-", "--", "-.", ":")
LAYER_AXIS = "layer (0 = LLM input, k = after decoder layer k)"  # one wording in every plot


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; a clear ImportError when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as err:  # an optional dependency: pip install "hf-normalign[plots]"
        raise ImportError("the report plots need matplotlib: pip install 'hf-normalign[plots]'") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def variant_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One look per model, in drawing order: colour, marker, line style, and a line width and marker size
    that shrink with the order, so a curve drawn later over an identical one leaves it visible around it.

    Example:
        >>> s = variant_styles(["a", "b"])
        >>> s["a"]["marker"], s["b"]["marker"], s["a"]["lw"] > s["b"]["lw"]
        ('o', 's', True)
    """
    cycle = pyplot().get_cmap("tab10")
    n = len(names)
    return {
        name: {
            "color": cycle(i % 10),
            "marker": _MARKERS[i % len(_MARKERS)],
            "ls": _DASHES[i % len(_DASHES)],
            "lw": 1.2 + 1.1 * (n - 1 - i),
            "ms": 4.0 + 1.6 * (n - 1 - i),
        }
        for i, name in enumerate(names)
    }


def _line(style: Mapping[str, Any], ls: str | None = None) -> dict[str, Any]:
    """plot() keywords of one model's line: hollow markers, so nested ones show through."""
    return {
        "color": style["color"],
        "ls": style["ls"] if ls is None else ls,
        "lw": style["lw"],
        "marker": style["marker"],
        "ms": style["ms"],
        "mfc": "none",
        "mew": 1.2,
    }


def figure(ncols: int, nrows: int = 1, width: float = 5.2, height: float = 3.6) -> tuple[Any, list[Any]]:
    """A constrained-layout figure of ``nrows x ncols`` panels of ``width x height`` inches; (fig, flat axes)."""
    plt = pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, layout="constrained")
    return fig, [ax for row in axes for ax in row]


def finish(ax: Any, title: str, xlabel: str, ylabel: str, handles: list[Any] | None = None) -> None:
    """Title, axis labels, grid, integer x ticks, and the legend below the axes (``handles``, else the
    labelled lines; none when nothing is labelled)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(
            handles=handles,
            fontsize=8,
            frameon=False,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncols=min(3, len(handles)),
        )


def plain_log_axis(ax: Any) -> None:
    """Log y axis with plain tick labels (``0.5``, ``2``, ``100``), not ``2x10^0``."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(plain)


def png_bytes(fig: Any, path: str | Path | None = None) -> bytes:
    """The figure as PNG bytes at :data:`DPI` (also written to ``path`` if given); closes the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    pyplot().close(fig)
    data = buffer.getvalue()
    if path is not None:
        write_file_atomically(path, data)
    return data


def coinciding(series: Mapping[str, Sequence[float]], tolerance: float = 0.01) -> list[list[str]]:
    """Groups (two or more names) of series that coincide: every point within ``tolerance`` times the
    span of all values (at least 1e-12), i.e. closer than a plot of them can show. Non-finite points
    must match exactly in kind. Series of different length never coincide.

    Example:
        >>> coinciding({"a": [0.0, 10.0], "b": [0.05, 10.0], "c": [5.0, 5.0]})
        [['a', 'b']]
    """
    finite = [v for vals in series.values() for v in vals if math.isfinite(v)]
    span = max(max(finite) - min(finite), 1e-12) if finite else 1e-12

    def close(a: Sequence[float], b: Sequence[float]) -> bool:
        if len(a) != len(b):
            return False
        for x, y in zip(a, b, strict=True):
            if math.isfinite(x) and math.isfinite(y):
                if abs(x - y) > tolerance * span:
                    return False
            elif not (x == y or (math.isnan(x) and math.isnan(y))):
                return False
        return True

    groups: list[list[str]] = []
    for name, values in series.items():
        group = next((g for g in groups if close(series[g[0]], values)), None)
        if group is None:
            groups.append([name])
        else:
            group.append(name)
    return [g for g in groups if len(g) > 1]


def _legend(styles: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str]) -> list[Any]:
    """A compact legend: one entry per model (colour, marker), one per line style of ``kinds``."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], **{**_line(s, "-"), "lw": 2, "ms": 6}, label=m) for m, s in styles.items()] + [
        Line2D([], [], color="grey", ls=ls, label=label) for label, ls in kinds.items()
    ]


def _positive(values: Sequence[float]) -> bool:
    return all(v > 0 and math.isfinite(v) for v in values)


def _band(ax: Any, x: Sequence[int], mean: Sequence[float], std: Sequence[float], color: Any) -> None:
    """± std as a faint fill with thin edges: several bands stay apart instead of blending into one."""
    lo = [m - (s if math.isfinite(s) else 0.0) for m, s in zip(mean, std, strict=True)]
    hi = [m + (s if math.isfinite(s) else 0.0) for m, s in zip(mean, std, strict=True)]
    ax.fill_between(x, lo, hi, color=color, alpha=0.06, linewidth=0)
    for edge in (lo, hi):
        ax.plot(x, edge, color=color, lw=0.6, alpha=0.6)


def plot_norms(profiles: Mapping[str, Any]) -> Any:
    """Mean L2 norm per layer of vision (solid, ± std band) and text (dashed) tokens, and their ratio."""
    fig, (ax, ax_ratio) = figure(2)
    styles = variant_styles(list(profiles))
    log = True
    for name, p in profiles.items():
        s = styles[name]
        for mean, std, ls in (
            (p.vision_norm_mean, p.vision_norm_std, _VISION),
            (p.text_norm_mean, p.text_norm_std, _TEXT),
        ):
            ax.plot(p.layers, mean, **_line(s, ls))
            _band(ax, p.layers, mean, std, s["color"])
            log = log and _positive(mean)
        ax_ratio.plot(p.layers, p.norm_ratio, **_line(s))
    if log:
        plain_log_axis(ax)
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    if all(_positive(p.norm_ratio) for p in profiles.values()):
        plain_log_axis(ax_ratio)
    finish(
        ax,
        "Token L2 norm (mean, band ± std)",
        LAYER_AXIS,
        "L2 norm",
        _legend(styles, {"vision": _VISION, "text": _TEXT}),
    )
    finish(ax_ratio, "Norm ratio vision / text", LAYER_AXIS, "ratio (1 = same norm)", _legend(styles, {}))
    return fig


def plot_update_rate(profiles: Mapping[str, Any]) -> Any:
    """Adjacent-layer cosine cos(h_{l-1}, h_l) per modality: near 1 = decoder layer l barely moves the token."""
    fig, (ax,) = figure(1, width=7.0)
    styles = variant_styles(list(profiles))
    for name, p in profiles.items():
        ax.plot(p.update_layers, p.vision_update_cos, **_line(styles[name], _VISION))
        ax.plot(p.update_layers, p.text_update_cos, **_line(styles[name], _TEXT))
    finish(
        ax,
        r"Update rate: mean $\cos(h_{l-1},\, h_l)$",
        "decoder layer l",
        "cosine (1 = token unchanged)",
        _legend(styles, {"vision": _VISION, "text": _TEXT}),
    )
    return fig


def plot_mir(mirs: Mapping[str, Any]) -> Any:
    """Per-layer FID between vision and text tokens, the MIR in the legend."""
    fig, (ax,) = figure(1, width=7.0)
    styles = variant_styles(list(mirs))
    log = True
    for name, r in mirs.items():
        ax.plot(r.layers, r.per_layer, **_line(styles[name]), label=f"{name} (MIR {r.mir:.2f})")
        log = log and _positive(r.per_layer)
    if log:
        plain_log_axis(ax)
    finish(ax, "Per-layer FID (vision vs text); MIR = log10 of the sum", LAYER_AXIS, "FID (log scale)")
    return fig


def plot_key_gap(results: Mapping[str, Any]) -> Any:
    """Key-space MMD^2 and JSD per layer, cross-modal (solid) against the intra-modal halves (dotted)."""
    fig, (ax_mmd, ax_jsd) = figure(2)
    styles = variant_styles(list(results))
    kinds = {"vision vs text": _VISION, "vision halves": _BASELINE, "text halves": _TEXT}
    for name, r in results.items():
        s = styles[name]
        for ax, cross, v_halves, t_halves in (
            (ax_mmd, r.mmd2, r.mmd2_vision_halves, r.mmd2_text_halves),
            (ax_jsd, r.jsd, r.jsd_vision_halves, r.jsd_text_halves),
        ):
            ax.plot(r.layers, cross, **_line(s, _VISION))
            ax.plot(r.layers, v_halves, _BASELINE, color=s["color"], lw=1)
            ax.plot(r.layers, t_halves, _TEXT, color=s["color"], lw=1, alpha=0.6)
    finish(ax_mmd, "Attention keys: MMD² (RBF)", "decoder layer", "MMD²", _legend(styles, kinds))
    finish(ax_jsd, "Attention keys: JSD of PCA histograms", "decoder layer", "JSD", _legend(styles, kinds))
    return fig


def plot_key_scatter(results: Mapping[str, Any]) -> Any:
    """2-D shared-PCA scatter of vision and text keys: one row per model, one column per stored layer."""
    names = list(results)
    ncols = max((len(r.scatter) for r in results.values()), default=1) or 1
    fig, axes = figure(ncols, nrows=len(names), width=3.6, height=3.3)
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
            ax.set_title(f"{name}: decoder layer {layers[col]}", fontsize=10)
            ax.set_xlabel("PC 1")
            ax.set_ylabel("PC 2")
            ax.legend(fontsize=7, frameon=False, markerscale=2)
    return fig


def plot_degradation(results: Mapping[str, Any]) -> Any:
    """Effective dimension, |correlation|, patch contrast ratio and linear-probe accuracy per layer."""
    fig, axes = figure(2, nrows=2, width=5.0, height=3.6)
    styles = variant_styles(list(results))
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
            ax.plot(r.layers, values, **_line(styles[name]), label=name)
            if key == "probe_accuracy" and r.probe_chance is not None:
                ax.axhline(r.probe_chance, color=styles[name]["color"], ls=_BASELINE, lw=1)
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
        finish(ax, title, LAYER_AXIS, ylabel)
    return fig
