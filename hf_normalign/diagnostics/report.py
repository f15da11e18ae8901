"""The diagnostics report: one self-contained ``report.html``, the PNG plots and ``report.json``.

:func:`build_report` runs, for every model given, the norm / update-rate profile
(:func:`~.metrics.profile.modality_profile`), MIR with its per-layer FID (:func:`~.metrics.mir.mir`), the
key-space gap (:func:`~.metrics.keyspace.key_space_gap`) and the visual-degradation curves
(:func:`~.metrics.degradation.visual_degradation`), overlays the models in each plot, and writes

- ``report.html``: summary table, plots embedded as base64 PNG (opens anywhere, offline), and the
  per-layer numbers of every model in collapsible tables;
- ``norms.png``, ``update_rate.png``, ``mir.png``, ``key_gap.png``, ``key_scatter.png``,
  ``degradation.png``, and ``key_tsne.png`` with ``key_tsne=True``;
- ``report.json``: every number shown (the results' ``to_dict()`` plus the summary).

What the page shows (plots, captions, tables, the HTML) is :mod:`.report_page`.

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
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..console import emit
from ..persistence.staging import write_file_atomically
from . import plots
from .html import safe_href
from .metrics.degradation import DegradationResult, visual_degradation
from .metrics.keyspace import KeySpaceResult, key_space_gap
from .metrics.mir import mir
from .metrics.profile import ModalityProfile, modality_profile
from .report_page import PLOTS, format_number, render_page
from .results import json_float

__all__ = ["METRICS", "Report", "build_report"]

METRICS: tuple[str, ...] = ("profile", "mir", "key_space", "degradation")


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
        links: label -> href shown in the page header, e.g. ``{"demo report": "../report.html"}``: http(s) URLs
            and relative paths only (another scheme, such as ``javascript:``, raises ``ValueError``).
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
    for href in (links or {}).values():  # before any work: a javascript: link is refused, not written
        safe_href(href)
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
    for stem, (metric, draw, *_) in tqdm(PLOTS.items(), desc="plots", disable=not progress, leave=False):
        if metric not in chosen:
            continue
        fig = draw({name: res[metric] for name, res in results.items()})
        if fig is None:  # nothing to draw (the t-SNE map when not asked for)
            continue
        written[stem] = out / f"{stem}.png"
        plots.png_bytes(fig, written[stem])

    data = _json_data(models, results, summary, written, opts, title)
    json_path = out / "report.json"
    write_file_atomically(json_path, json.dumps(data, indent=1, allow_nan=False) + "\n")
    html_path = out / "report.html"
    write_file_atomically(html_path, render_page(data, written, links or {}))
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
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
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
    """``normalign report`` (options, and the usage checks done before this runs, in hf_normalign.cli)."""
    sources = [args.model, *args.compare]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    probe = None
    if args.images is not None:
        from .probes import load_probe

        probe = load_probe(args.images, args.texts, num_samples=args.num_samples, seed=args.seed)
    models = {name: _load(src, device, args.dtype) for name, src in zip(_names(sources), sources, strict=True)}
    report = build_report(
        models,
        args.out,
        probe,
        metrics=args.metrics,
        num_samples=args.num_samples,
        degradation_samples=args.degradation_samples,
        batch_size=args.batch_size,
        key_layers=args.key_layers,
        max_key_samples=args.max_key_samples,
        seed=args.seed,
        title=args.title,
        progress=not args.no_progress,
    )
    for name, values in report.summary.items():
        emit(f"{name}: " + ", ".join(f"{k} {format_number(v)}" for k, v in values.items() if v is not None))
    emit(f"wrote {report.html}, {report.json} and {len(report.plots)} plots")
    return 0
