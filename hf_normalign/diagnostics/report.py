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

Passes: profile, MIR and the key-space gap run over the same encoded probe in ONE pass per model
(:func:`~.runner.run_metrics`); the degradation metrics use their own labelled probe (the shapes probe: other
images, labels, 60 pairs by default), so they take one pass of their own. Each result equals the metric's own
call with the same arguments; the summary row of a model joins each result's ``summary()``.

Command line (:mod:`hf_normalign.commands.report`): ``normalign report MODEL [--compare MODEL2 ...] --out DIR``.

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

import datetime as _dt
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..model_view import ModelView
from ..persistence.staging import write_file_atomically
from . import plots
from .html import safe_href
from .maths.keyspace import KeySpaceOptions
from .metrics.degradation import degradation_run
from .metrics.keyspace import key_space_run
from .metrics.mir import mir_run
from .metrics.profile import profile_run
from .probes.encoding import prepare_probe
from .report_page import PLOTS, format_number, render_page
from .results import json_float
from .runner import MetricRun, RunOptions, run_metrics

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

    def summary_lines(self) -> list[str]:
        """One line per model: its headline numbers (what ``normalign report`` prints)."""
        return [
            f"{name}: " + ", ".join(f"{k} {format_number(v)}" for k, v in values.items() if v is not None)
            for name, values in self.summary.items()
        ]


# ----------------------------------------------------------------------------------------------------------
# Running the diagnostics
# ----------------------------------------------------------------------------------------------------------


def _prepared(
    metrics: Sequence[str],
    model: Any,
    processor: Any,
    probe: Any,
    degradation_probe: Any,
    opts: Mapping[str, Any],
    run: RunOptions,
) -> list[MetricRun]:
    """The chosen metrics of one model, prepared; profile, MIR and key-space share one encoding of ``probe`` (so
    :func:`~.runner.run_metrics` runs them in one pass), degradation has its own labelled probe."""
    view = ModelView.of(model)
    data = {"num_samples": opts["num_samples"], "seed": opts["seed"], "run": run}
    shared = None
    if any(m in metrics for m in ("profile", "mir", "key_space")):
        shared = prepare_probe(processor, probe, num_samples=opts["num_samples"], seed=opts["seed"],
                               progress=opts["progress"])  # fmt: skip
    build: dict[str, Callable[[], MetricRun]] = {
        "profile": lambda: profile_run(view, processor, probe, **data, samples=shared),
        "mir": lambda: mir_run(view, processor, probe, **data, samples=shared),
        "key_space": lambda: key_space_run(
            view, processor, probe, opts["key_layers"], **data, samples=shared,
            options=KeySpaceOptions(max_samples=opts["max_key_samples"], seed=opts["seed"], tsne=opts["key_tsne"]),
        ),
        "degradation": lambda: degradation_run(
            view, processor, degradation_probe, num_samples=opts["degradation_samples"], seed=opts["seed"], run=run
        ),
    }  # fmt: skip
    return [build[m]() for m in metrics]


def _summary(results: Mapping[str, Any]) -> dict[str, float | None]:
    """Headline numbers of one model: each result's own ``summary()``, in metric order."""
    out: dict[str, float | None] = {}
    for metric in METRICS:
        if results.get(metric) is not None:
            out.update(results[metric].summary())
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
    results: dict[str, dict[str, Any]] = {}
    run = RunOptions(batch_size=batch_size, progress=progress)
    with tqdm(list(models), desc="report", unit="model", disable=not progress) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            model, processor = models[name]
            prepared = _prepared(chosen, model, processor, probe, degradation_probe, opts, run)
            results[name] = run_metrics(model, processor, prepared, run)
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
