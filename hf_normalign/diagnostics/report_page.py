"""What the diagnostics report shows: the plots with their captions, the per-layer tables (from each result
class's ``TABLES``), the summary and vision-path tables, and the HTML page (:func:`render_page`).
:mod:`.report` runs the metrics and writes the files.

Example:
    >>> plot_caption("mir", {"a": {"per_layer": [3.0, 1.0]}, "b": {"per_layer": [3.0, 1.0]}})[-78:]
    'a and b coincide here (within 1% of the axis range); their markers are nested.'
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from . import plots
from .html import GLOSSARY, Raw, best_row, column_decimals, figure, format_fixed, glossary, page, section, table
from .metrics.degradation import DegradationResult
from .metrics.keyspace import KeySpaceResult
from .metrics.mir import MIRResult
from .metrics.profile import ModalityProfile
from .results import Result

__all__ = ["PLOTS", "SUMMARY_LABELS", "coincidence_note", "format_number", "plot_caption", "render_page"]


# summary key -> its row label in the summary table (and the command line's printout)
SUMMARY_LABELS = {
    "mir": "MIR (lower = better integrated)",
    "norm_ratio_input": "norm ratio vision/text, LLM input",
    "norm_ratio_last": "norm ratio vision/text, last layer",
    "vision_update_cos_mean": "update cos, vision (mean over layers)",
    "text_update_cos_mean": "update cos, text (mean over layers)",
    "vision_encoder_norm": "vision-encoder output norm (projector input)",
    "projector_output_norm": "projector output norm (before its LayerNorm)",
    "gain_mean_abs": "projector LayerNorm gain, mean |g|",
    "gain_mean_abs_to_init": "gain mean |g| / init T/√D",
    "key_mmd2_mean": "key MMD², vision vs text (mean)",
    "key_mmd2_intra_mean": "key MMD², intra-modal halves (mean)",
    "key_jsd_mean": "key JSD, vision vs text (mean)",
    "effective_dim_input": "effective dimension, LLM input",
    "effective_dim_last": "effective dimension, last layer",
    "contrast_ratio_input": "patch contrast ratio, LLM input",
    "contrast_ratio_last": "patch contrast ratio, last layer",
    "probe_accuracy_input": "linear-probe accuracy, LLM input",
    "probe_accuracy_last": "linear-probe accuracy, last layer",
    "probe_chance": "linear-probe chance level",
}


def _plot_key_tsne(results: Mapping[str, Any]) -> Any:
    """The t-SNE points (``key_space_gap(tsne=True)``) drawn like the PCA scatter; None when no model has them."""
    tsne = {
        name: SimpleNamespace(scatter={layer: pts["tsne"] for layer, pts in r.scatter.items() if "tsne" in pts})
        for name, r in results.items()
    }
    if not any(t.scatter for t in tsne.values()):
        return None
    fig = plots.plot_key_scatter(tsne)
    for ax in fig.axes:  # the PCA plot's axis names
        if ax.get_xlabel():
            ax.set_xlabel("t-SNE 1")
            ax.set_ylabel("t-SNE 2")
    return fig


# plot file stem -> (metric it needs, plotting function, caption: what to look at, result keys whose curves
# the plot draws, compared to name the models that coincide)
PLOTS: dict[str, tuple[str, Callable[[Mapping[str, Any]], Any], str, tuple[str, ...]]] = {
    "norms": (
        "profile",
        plots.plot_norms,
        "Left: L2 norm of vision (solid) and text (dashed) tokens per layer, band = ± std over tokens. Right: "
        "their ratio. Look at layer 0: vision tokens usually enter far louder than text (ratio far above 1); a "
        "projector LayerNorm brings the ratio towards 1. The last layer is before the final norm.",
        ("vision_norm_mean", "text_norm_mean", "norm_ratio"),
    ),
    "update_rate": (
        "profile",
        plots.plot_update_rate,
        "Mean cosine between a token's hidden state before and after each decoder layer. Vision (solid) "
        "close to 1 while text (dashed) is lower means the layers hardly turn the vision tokens "
        "(representational inertia of loud tokens).",
        ("vision_update_cos", "text_update_cos"),
    ),
    "mir": (
        "mir",
        plots.plot_mir,
        "Fréchet distance between vision and text tokens per layer (log scale); MIR in the legend = log10 of "
        "their sum, lower = better integrated. The last layer is after the final norm, which usually "
        "drops the distance sharply there.",
        ("per_layer",),
    ),
    "key_gap": (
        "key_space",
        plots.plot_key_gap,
        "Attention keys of vision vs text tokens (solid) against random halves of one modality (dotted, "
        "dashed: the value with no gap). Solid far above the halves = keys separate the modalities.",
        ("mmd2", "jsd"),
    ),
    "key_scatter": (
        "key_space",
        plots.plot_key_scatter,
        "Vision (orange) and text (blue) keys projected on their shared first two principal components: "
        "two separate clouds = a gap in key space.",
        (),
    ),
    "key_tsne": (
        "key_space",
        _plot_key_tsne,
        "The same keys as the PCA scatter, as a 2-D t-SNE map (scikit-learn, seeded). t-SNE keeps "
        "neighbourhoods, not distances: two separate clouds = keys separate the modalities; the clouds' sizes "
        "and the gap between them mean nothing.",
        (),
    ),
    "degradation": (
        "degradation",
        plots.plot_degradation,
        "Vision features across depth: effective dimension (higher = richer), redundancy (lower = better), "
        "object contrast (above 1 = objects stay distinguishable) and linearly decodable image class "
        "(dotted: chance). Falling curves = visual information lost with depth.",
        ("effective_dim", "offdiag_corr", "contrast_ratio", "probe_accuracy"),
    ),
}


_SECTIONS: dict[str, tuple[str, list[str]]] = {
    "profile": ("Norms and update rate", ["norms", "update_rate"]),
    "mir": ("Modality Integration Rate", ["mir"]),
    "key_space": ("Key-space gap", ["key_gap", "key_scatter", "key_tsne"]),
    "degradation": ("Visual degradation", ["degradation"]),
}


# metric -> glossary terms its section uses
_TERMS: dict[str, tuple[str, ...]] = {
    "profile": ("layer numbering", "final norm", "update rate", "units", "vision path norms", "LayerNorm gain"),
    "mir": ("layer numbering", "final norm", "FID", "MIR"),
    "key_space": ("MMD²", "JSD"),
    "degradation": ("layer numbering",),
}


# metric -> its result class: the per-layer tables of the report are the class's ``TABLES``
_RESULTS: dict[str, type[Result]] = {
    "profile": ModalityProfile,
    "mir": MIRResult,
    "key_space": KeySpaceResult,
    "degradation": DegradationResult,
}


# summary key -> which value is best across models ("min", "max", "one" = ratio closest to 1)
_BEST: dict[str, str] = {
    "mir": "min",
    "norm_ratio_input": "one",
    "norm_ratio_last": "one",
    "key_mmd2_mean": "min",
    "key_jsd_mean": "min",
    "effective_dim_last": "max",
    "contrast_ratio_last": "max",
    "probe_accuracy_last": "max",
}


def format_number(value: Any) -> str:
    """How the command line prints a number: 4 significant digits, ints as is, None as a dash, "nan" as text."""
    if value is None:
        return "–"
    if isinstance(value, (bool, str, int)):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _fixed_columns(columns: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Each column formatted with one number of decimals (ints and None kept as they are)."""
    out = []
    for values in columns:
        if all(v is None or isinstance(v, (int, str)) for v in values):
            out.append(list(values))
            continue
        decimals = column_decimals(values)
        out.append([format_fixed(v, decimals) for v in values])
    return out


def _layer_table(metric: str, result: Mapping[str, Any]) -> str:
    """The HTML tables of one result (its ``to_dict()``), one per ``TABLES`` entry of its class."""
    out = ""
    for t in _RESULTS[metric].TABLES:
        present = [c for c in t.columns if c.report and result.get(c.key) is not None]
        cols = _fixed_columns([result[c.key] for c in present])
        rows = [[index, *(col[i] for col in cols)] for i, index in enumerate(result[t.index])]
        out += table([t.index_header, *(c.header for c in present)], rows)
    return out


def coincidence_note(results: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> str:
    """A sentence naming the models whose curves of ``keys`` coincide in a plot (empty when none do).

    ``results``: model name -> the metric's ``to_dict()``. Two models coincide when every one of the
    keys' curves does (:func:`plots.coinciding`, per key).
    """
    groups_per_key = []
    for key in keys:
        series = {n: [float(v) for v in r[key]] for n, r in results.items() if r.get(key) is not None}
        if len(series) == len(results):
            groups_per_key.append(plots.coinciding(series))
    if not groups_per_key:
        return ""
    signature = {
        n: tuple(next((i for i, g in enumerate(gs) if n in g), None) for gs in groups_per_key) for n in results
    }
    groups: dict[tuple, list[str]] = {}
    for name, sig in signature.items():
        if None not in sig:
            groups.setdefault(sig, []).append(name)
    sentences = [
        f"{', '.join(g[:-1])} and {g[-1]} coincide here (within 1% of the axis range); their markers are nested."
        for g in groups.values()
        if len(g) > 1
    ]
    return " ".join(sentences)


def plot_caption(stem: str, results: Mapping[str, Mapping[str, Any]]) -> str:
    """The caption of plot ``stem`` (``"norms"``, ``"mir"``...): what to look at, plus the note naming the
    models that coincide in it. ``results``: model name -> that plot's metric as ``to_dict()``.

    Example:
        >>> plot_caption("mir", {"a": {"per_layer": [3.0, 1.0]}, "b": {"per_layer": [3.0, 1.0]}})[-78:]
        'a and b coincide here (within 1% of the axis range); their markers are nested.'
    """
    caption, keys = PLOTS[stem][2], PLOTS[stem][3]
    note = coincidence_note(results, keys) if len(results) > 1 else ""
    return f"{caption} {note}".strip()


def _summary_table(data: Mapping[str, Any], names: Sequence[str]) -> str:
    """Quantities as rows, models as columns: each row with one number of decimals, its best model marked."""
    keys = [k for k in SUMMARY_LABELS if any(k in data["models"][n]["summary"] for n in names)]
    rows, best = [], set()
    for i, key in enumerate(keys):
        values = [data["models"][n]["summary"].get(key) for n in names]
        numbers = [v if isinstance(v, (int, float)) else math.nan for v in values]
        if key in _BEST and (j := best_row(numbers, _BEST[key])) is not None:
            best.add((i, j + 1))
        rows.append([SUMMARY_LABELS[key], *_fixed_columns([values])[0]])
    note = '<p class="caption">Underlined bold: the best model of the row, where one direction is better.</p>'
    return table(["", *names], rows, best=best) + (note if best else "")


_VISION_PATH_ROWS: dict[str, str] = {
    "vision_encoder_output": "vision-encoder output (projector input)",
    "projector_output": "projector output, before its LayerNorm",
    "llm_input_vision": "vision tokens at the LLM input",
    "text_embedding": "text-passage embeddings",
}


_GAIN_ROWS: dict[str, str] = {
    "mean_abs": "gain mean |g|",
    "l2": "gain ||g||₂",
    "init_value": "gain init T/√D",
    "mean_abs_to_init": "mean |g| / init",
    "l2_to_init": "||g||₂ / T",
    "gwc_scale": "GWC scale 1/mean |g|",
}


def _vision_path_table(data: Mapping[str, Any], names: Sequence[str]) -> str:
    """Mean L2 norm at each point of the vision path and the projector LayerNorm's gain: rows x models."""
    profiles = [data["models"][n]["profile"] for n in names]
    rows = []
    for stage, label in _VISION_PATH_ROWS.items():
        values = [p.get("vision_path_norms", {}).get(stage, {}).get("mean") for p in profiles]
        rows.append([f"{label}, mean norm", *_fixed_columns([values])[0]])
    for key, label in _GAIN_ROWS.items():
        values = [(p.get("projector_gain") or {}).get(key) for p in profiles]
        rows.append([label, *_fixed_columns([values])[0]])
    note = (
        '<p class="caption">Mean L2 norm of the rows at each point (the norm paper\'s measurements) and the '
        "projector LayerNorm's gain; a dash where the model has no projector LayerNorm.</p>"
    )
    return "<h3>Vision path norms and LayerNorm gain</h3>" + table(["", *names], rows) + note


def _settings_text(settings: Mapping[str, Any]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in settings.items())


def render_page(data: Mapping[str, Any], written: Mapping[str, Path], links: Mapping[str, str]) -> str:
    """``report.html``: ``data`` as written to ``report.json``, ``written`` plot stem -> PNG path, header links."""
    names = list(data["models"])
    subtitle = Raw(
        ", ".join(f"<b>{html.escape(n)}</b> ({html.escape(data['models'][n]['source'])})" for n in names)
        + f" &middot; hf-normalign {html.escape(data['hf_normalign_version'])}"
    )
    parts = [section("summary", "Summary", _summary_table(data, names))]
    terms: list[str] = []
    for metric, (heading, stems) in _SECTIONS.items():
        if not any(metric in data["models"][n] for n in names):
            continue
        terms += [t for t in _TERMS[metric] if t not in terms]
        if metric == "key_space" and "key_tsne" in written:
            terms.append("t-SNE")
        body = []
        for stem in stems:
            if stem not in written:
                continue
            caption = plot_caption(stem, {n: data["models"][n][metric] for n in names})
            name = written[stem].name
            body.append(figure(written[stem].read_bytes(), PLOTS[stem][2], caption, href=name, file=name))
        if metric == "profile":
            body.append(_vision_path_table(data, names))
        for n in names:
            result = data["models"][n][metric]
            body.append(
                f"<details><summary>{html.escape(n)}: numbers per layer</summary>"
                f"{_layer_table(metric, result)}"
                f'<p class="caption">{html.escape(_settings_text(result.get("settings", {})))}</p>'
                "</details>"
            )
        parts.append(section(metric, heading, *body))
    parts.append(glossary([t for t in GLOSSARY if t in terms]))
    return page(data["title"], subtitle, parts, links=links, created=data["created"])
