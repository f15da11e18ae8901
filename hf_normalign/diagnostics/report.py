"""The diagnostics report: one self-contained ``report.html``, the PNG plots and ``report.json``.

:func:`build_report` runs, for every model given, the norm / update-rate profile
(:func:`~.profile.modality_profile`), MIR with its per-layer FID (:func:`~.mir.mir`), the key-space
gap (:func:`~.keyspace.key_space_gap`) and the visual-degradation curves
(:func:`~.degradation.visual_degradation`), overlays the models in each plot, and writes

- ``report.html``: summary table, plots embedded as base64 PNG (opens anywhere, offline), and the
  per-layer numbers of every model in collapsible tables;
- ``norms.png``, ``update_rate.png``, ``mir.png``, ``key_gap.png``, ``key_scatter.png``,
  ``degradation.png``, and ``key_tsne.png`` with ``key_tsne=True``;
- ``report.json``: every number shown (the results' ``to_dict()`` plus the summary).

Command line: ``normalign report MODEL [--compare MODEL2 ...] --out DIR``.

Example:
    >>> from hf_normalign.testing import tiny_model, tiny_processor
    >>> models = {"base": (tiny_model("llava"), tiny_processor("llava")),
    ...           "other seed": (tiny_model("llava", seed=1), tiny_processor("llava"))}
    >>> report = build_report(models, "/tmp/normalign-report", num_samples=6, degradation_samples=12,
    ...                       progress=False)  # doctest: +SKIP
    >>> report.html  # doctest: +SKIP
    PosixPath('/tmp/normalign-report/report.html')
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from . import plots
from .degradation import DegradationResult, visual_degradation
from .html import GLOSSARY, Raw, best_row, column_decimals, figure, format_fixed, glossary, page, section, table
from .keyspace import KeySpaceResult, key_space_gap
from .profile import ModalityProfile, json_float, modality_profile

__all__ = ["METRICS", "Report", "build_report", "coincidence_note", "format_number", "plot_caption"]

METRICS: tuple[str, ...] = ("profile", "mir", "key_space", "degradation")


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
_PLOTS: dict[str, tuple[str, Callable[[Mapping[str, Any]], Any], str, tuple[str, ...]]] = {
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


@dataclass
class Report:
    """What :func:`build_report` wrote and computed.

    Attributes:
        out_dir, html, json: the output folder, ``report.html`` and ``report.json``.
        plots: plot name -> PNG path.
        results: model name -> metric name -> result object (``ModalityProfile``, ``MIRResult``, ...).
        summary: model name -> headline numbers (also in the JSON and the HTML summary table).
    """

    out_dir: Path
    html: Path
    json: Path
    plots: dict[str, Path]
    results: dict[str, dict[str, Any]]
    summary: dict[str, dict[str, float | None]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Running the diagnostics
# ----------------------------------------------------------------------------------------------------------


def _run_metric(
    metric: str, model: Any, processor: Any, probe: Any, degradation_probe: Any, opts: dict[str, Any]
) -> Any:
    common = {"batch_size": opts["batch_size"], "seed": opts["seed"], "progress": opts["progress"]}
    if metric == "profile":
        return modality_profile(model, processor, probe, num_samples=opts["num_samples"], **common)
    if metric == "mir":
        from .mir import mir

        return mir(model, processor, probe, num_samples=opts["num_samples"], **common)
    if metric == "key_space":
        return key_space_gap(
            model,
            processor,
            probe,
            opts["key_layers"],
            num_samples=opts["num_samples"],
            max_samples=opts["max_key_samples"],
            tsne=opts["key_tsne"],
            **common,
        )
    return visual_degradation(model, processor, degradation_probe, num_samples=opts["degradation_samples"], **common)


def _first_last(values: Sequence[float] | None, layers: Sequence[int]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return (values[0] if layers[0] == 0 else None), values[-1]


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals)


def _summary(results: Mapping[str, Any]) -> dict[str, float | None]:
    """Headline numbers of one model (None where a metric was not run)."""
    out: dict[str, float | None] = {}
    prof: ModalityProfile | None = results.get("profile")
    if prof is not None:
        out["norm_ratio_input"], out["norm_ratio_last"] = _first_last(prof.norm_ratio, prof.layers)
        out["vision_update_cos_mean"] = _mean(prof.vision_update_cos) if prof.update_layers else None
        out["text_update_cos_mean"] = _mean(prof.text_update_cos) if prof.update_layers else None
        out["vision_encoder_norm"] = prof.vision_path_norms.get("vision_encoder_output", {}).get("mean")
        out["projector_output_norm"] = prof.vision_path_norms.get("projector_output", {}).get("mean")
        out["gain_mean_abs"] = prof.projector_gain["mean_abs"] if prof.projector_gain else None
        out["gain_mean_abs_to_init"] = prof.projector_gain["mean_abs_to_init"] if prof.projector_gain else None
    if results.get("mir") is not None:
        out["mir"] = results["mir"].mir
    keys: KeySpaceResult | None = results.get("key_space")
    if keys is not None:
        out["key_mmd2_mean"] = _mean(keys.mmd2)
        out["key_mmd2_intra_mean"] = _mean(
            0.5 * (a + b) for a, b in zip(keys.mmd2_vision_halves, keys.mmd2_text_halves, strict=True)
        )
        out["key_jsd_mean"] = _mean(keys.jsd)
    deg: DegradationResult | None = results.get("degradation")
    if deg is not None:
        out["effective_dim_input"], out["effective_dim_last"] = _first_last(deg.effective_dim, deg.layers)
        out["contrast_ratio_input"], out["contrast_ratio_last"] = _first_last(deg.contrast_ratio, deg.layers)
        out["probe_accuracy_input"], out["probe_accuracy_last"] = _first_last(deg.probe_accuracy, deg.layers)
        out["probe_chance"] = deg.probe_chance
    return out


_SUMMARY_LABELS = {
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


def build_report(
    models: Mapping[str, tuple[Any, Any]],
    out_dir: str | os.PathLike,
    probe: Any = None,
    *,
    degradation_probe: Any = None,
    metrics: Sequence[str] = METRICS,
    num_samples: int | None = 100,
    degradation_samples: int | None = 60,
    batch_size: int = 8,
    key_layers: Iterable[int] | None = None,
    max_key_samples: int | None = 2000,
    key_tsne: bool = False,
    seed: int = 0,
    title: str = "hf-normalign diagnostics",
    links: Mapping[str, str] | None = None,
    progress: bool = True,
) -> Report:
    """Run the diagnostics on every model and write ``report.html``, the PNG plots and ``report.json``.

    Args:
        models: ``{name: (model, processor)}``; one or more, overlaid in every plot in this order.
        out_dir: output folder (created).
        probe: probe of the profile, MIR and key-space gap (default: the built-in probe).
        degradation_probe: probe of the degradation metrics (default: the labelled shapes probe).
        metrics: any of ``METRICS`` ("profile", "mir", "key_space", "degradation").
        num_samples / degradation_samples: pairs used from each probe (seeded subsets).
        batch_size: samples per forward pass.
        key_layers: decoder layers of the key-space gap (default all).
        max_key_samples: keys kept per modality and layer.
        key_tsne: add a t-SNE map of the keys next to the PCA scatter (``key_tsne.png``; needs
            scikit-learn: ``pip install "hf-normalign[tsne]"``).
        seed: seed of the subsets and the samplers.
        title: heading of the HTML page.
        links: label -> href shown in the page header, e.g. ``{"demo report": "../report.html"}``.
        progress: tqdm progress bars.

    Example:
        >>> from hf_normalign.testing import tiny_model, tiny_processor
        >>> r = build_report({"tiny": (tiny_model("qwen2_vl"), tiny_processor("qwen2_vl"))}, "/tmp/rep",
        ...                  metrics=["profile"], num_samples=4, progress=False)
        >>> sorted(r.plots)
        ['norms', 'update_rate']
    """
    if not models:
        raise ValueError("build_report needs at least one model")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    for name, pair in models.items():
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"models[{name!r}] must be a (model, processor) tuple")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = {
        "num_samples": num_samples,
        "degradation_samples": degradation_samples,
        "batch_size": batch_size,
        "key_layers": None if key_layers is None else list(key_layers),
        "max_key_samples": max_key_samples,
        "key_tsne": key_tsne,
        "seed": seed,
        "progress": progress,
    }
    chosen = [m for m in METRICS if m in metrics]
    results: dict[str, dict[str, Any]] = {name: {} for name in models}
    steps = [(name, metric) for name in models for metric in chosen]
    with tqdm(steps, desc="report", unit="step", disable=not progress) as bar:
        for name, metric in bar:
            bar.set_postfix_str(f"{name}: {metric}")
            model, processor = models[name]
            results[name][metric] = _run_metric(metric, model, processor, probe, degradation_probe, opts)
    summary = {name: _summary(res) for name, res in results.items()}

    written: dict[str, Path] = {}
    for stem, (metric, draw, *_) in tqdm(_PLOTS.items(), desc="plots", disable=not progress, leave=False):
        if metric not in chosen:
            continue
        fig = draw({name: res[metric] for name, res in results.items()})
        if fig is None:  # nothing to draw (the t-SNE map when not asked for)
            continue
        written[stem] = out / f"{stem}.png"
        plots.png_bytes(fig, written[stem])

    data = _json_data(models, results, summary, written, opts, title)
    json_path = out / "report.json"
    json_path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(_html(data, written, links or {}), encoding="utf-8")
    return Report(out, html_path, json_path, written, results, summary)


def _model_source(model: Any) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(model).__name__)


def _json_data(
    models: Mapping[str, tuple[Any, Any]],
    results: Mapping[str, Mapping[str, Any]],
    summary: Mapping[str, Mapping[str, float | None]],
    written: Mapping[str, Path],
    opts: Mapping[str, Any],
    title: str,
) -> dict[str, Any]:
    from .. import __version__

    return {
        "title": title,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hf_normalign_version": __version__,
        "settings": {k: v for k, v in opts.items() if k != "progress"},
        "plots": {stem: path.name for stem, path in written.items()},
        "models": {
            name: {
                "source": _model_source(models[name][0]),
                "model_type": str(getattr(getattr(models[name][0], "config", None), "model_type", "")),
                "summary": {k: json_float(v) for k, v in summary[name].items()},
                **{metric: result.to_dict() for metric, result in results[name].items()},
            }
            for name in results
        },
    }


# ----------------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------------

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

# metric -> (columns of its per-layer table: JSON key -> header), JSON key holding the layer numbers
_TABLES: dict[str, tuple[dict[str, str], str]] = {
    "profile": (
        {
            "vision_norm_mean": "|vision| mean",
            "vision_norm_std": "|vision| std",
            "vision_norm_median": "|vision| median",
            "text_norm_mean": "|text| mean",
            "text_norm_std": "|text| std",
            "text_norm_median": "|text| median",
            "norm_ratio": "ratio",
        },
        "layers",
    ),
    "mir": ({"per_layer": "FID"}, "layers"),
    "key_space": (
        {
            "mmd2": "MMD²",
            "mmd": "MMD",
            "mmd2_unbiased": "MMD² unbiased",
            "mmd2_biased": "MMD² biased",
            "mmd2_vision_halves": "MMD² V|V",
            "mmd2_text_halves": "MMD² T|T",
            "jsd": "JSD",
            "jsd_vision_halves": "JSD V|V",
            "jsd_text_halves": "JSD T|T",
            "bandwidth": "bandwidth h",
            "jsd_bins": "JSD bins/axis",
        },
        "layers",
    ),
    "degradation": (
        {
            "effective_dim": "effective dim",
            "offdiag_corr": "|corr|",
            "offdiag_corr_signed": "corr (signed)",
            "cohesion": "cohesion",
            "coupling": "coupling",
            "contrast_ratio": "contrast cohesion/coupling",
            "contrast_ratio_shifted": "contrast (1+coh)/(1+coup)",
            "probe_accuracy": "probe accuracy",
        },
        "layers",
    ),
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
    columns, layer_key = _TABLES[metric]
    present = {k: h for k, h in columns.items() if result.get(k) is not None}
    cols = _fixed_columns([result[k] for k in present])
    rows = [[layer, *(col[i] for col in cols)] for i, layer in enumerate(result[layer_key])]
    out = table(["layer", *present.values()], rows)
    if metric == "profile":  # the update cosines are per decoder layer, a separate index
        vision, text = _fixed_columns([result["vision_update_cos"], result["text_update_cos"]])
        out += table(
            ["decoder layer", "cos vision", "cos text"], zip(result["update_layers"], vision, text, strict=True)
        )
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
        >>> plot_caption("mir", {"a": {"per_layer": [3.0, 1.0]}, "b": {"per_layer": [3.0, 1.0]}})[-60:]
        'a and b coincide here (within 1% of the axis range); their markers are nested.'
    """
    caption, keys = _PLOTS[stem][2], _PLOTS[stem][3]
    note = coincidence_note(results, keys) if len(results) > 1 else ""
    return f"{caption} {note}".strip()


def _summary_table(data: Mapping[str, Any], names: Sequence[str]) -> str:
    """Quantities as rows, models as columns: each row with one number of decimals, its best model marked."""
    keys = [k for k in _SUMMARY_LABELS if any(k in data["models"][n]["summary"] for n in names)]
    rows, best = [], set()
    for i, key in enumerate(keys):
        values = [data["models"][n]["summary"].get(key) for n in names]
        numbers = [v if isinstance(v, (int, float)) else math.nan for v in values]
        if key in _BEST and (j := best_row(numbers, _BEST[key])) is not None:
            best.add((i, j + 1))
        rows.append([_SUMMARY_LABELS[key], *_fixed_columns([values])[0]])
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


def _html(data: Mapping[str, Any], written: Mapping[str, Path], links: Mapping[str, str]) -> str:
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
            body.append(figure(written[stem].read_bytes(), _PLOTS[stem][2], caption, href=name, file=name))
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


# ----------------------------------------------------------------------------------------------------------
# Command line: normalign report MODEL [--compare MODEL2] --out DIR
# ----------------------------------------------------------------------------------------------------------


def _names(paths: Sequence[str]) -> list[str]:
    """Short, unique display names: the last path component, numbered when two agree."""
    base = [Path(p.rstrip("/\\")).name or p for p in paths]
    return [f"{b} ({i + 1})" if base.count(b) > 1 else b for i, b in enumerate(base)]


def _load(source: str, device: str, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..persistence import install

    install()  # aligned checkpoints (normalign_config.json) load patched
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, device_map=device)
    return model, AutoProcessor.from_pretrained(source)


def _main(args: argparse.Namespace) -> int:
    if (args.images is None) != (args.texts is None):
        print("normalign report: error: --images and --texts go together", file=sys.stderr)
        return 2
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:  # before loading any model
        print(f"normalign report: error: unknown metrics {unknown}; choose from {','.join(METRICS)}", file=sys.stderr)
        return 2
    sources = [args.model, *args.compare]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    probe = None
    try:
        if args.images is not None:
            from .probe import load_probe

            probe = load_probe(args.images, args.texts, num_samples=args.num_samples, seed=args.seed)
        models = {name: _load(src, device, args.dtype) for name, src in zip(_names(sources), sources, strict=True)}
        report = build_report(
            models,
            args.out,
            probe,
            metrics=metrics,
            num_samples=args.num_samples,
            degradation_samples=args.degradation_samples,
            batch_size=args.batch_size,
            key_layers=args.key_layers,
            max_key_samples=args.max_key_samples,
            seed=args.seed,
            title=args.title,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as err:
        print(f"normalign report: error: {err}", file=sys.stderr)
        return 2
    for name, values in report.summary.items():
        shown = ", ".join(f"{k} {format_number(v)}" for k, v in values.items() if v is not None)
        print(f"{name}: {shown}")
    print(f"wrote {report.html}, {report.json} and {len(report.plots)} plots")
    return 0
