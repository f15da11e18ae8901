"""The demo's outputs: the terminal table, ``results.json`` and the self-contained ``report.html``.

``report.html`` holds the task (example images with their captions and what each variant writes for them,
wrong words marked), the results table (mean ± std over seeds when there are several, best per column
marked, and a sentence saying which differences exceed the spread), the stage-1 loss curves, the norm /
update-rate / MIR plots of the library's diagnostics report (``diagnostics/report.html`` has their
per-layer numbers), the base model's scales, the checkpoint check, the timings and a glossary. Images are
embedded as base64 PNG, so the page opens anywhere, offline; each links to its full-size PNG file.

Example:
    >>> rows = {"baseline": {"caption_loss": 0.5, "token_accuracy": 0.7, "content_accuracy": 0.4}}
    >>> for line in format_table({"variants": rows}).splitlines()[:3]:
    ...     print(line)
    variant                      loss tok acc content
    -------------------------------------------------
    baseline                    0.500   0.700   0.400
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..diagnostics import plots
from ..diagnostics.html import Raw, best_row, figure, glossary, page, section, table
from ..diagnostics.report_page import plot_caption
from ..persistence.staging import write_file_atomically

__all__ = ["COLUMNS", "format_table", "plot_examples", "plot_training", "spread_sentence", "write_report"]

# results key -> (column header, format, which value is best: "min", "max", "one" = closest to 1, None);
# summary keys come from the diagnostics report.
COLUMNS: dict[str, tuple[str, str, str | None]] = {
    "caption_loss": ("loss", ".3f", "min"),
    "token_accuracy": ("tok acc", ".3f", "max"),
    "content_accuracy": ("content", ".3f", "max"),
    "colour_accuracy": ("colour", ".3f", "max"),
    "shape_accuracy": ("shape", ".3f", "max"),
    "position_accuracy": ("position", ".3f", "max"),
    "unseen_content_accuracy": ("unseen", ".3f", "max"),
    "mir": ("MIR", ".3f", "min"),
    "norm_ratio_input": ("|v|/|t| in", ".1f", "one"),
    "vision_update_cos_mean": ("cos v", ".4f", None),  # 4 decimals: 0.9998 vs 1 is the inertia
    "train_seconds": ("train s", ".1f", None),
}
# The columns the spread sentence compares (the headline numbers).
SPREAD_KEYS = ("caption_loss", "content_accuracy", "unseen_content_accuracy", "mir")
_NAME_WIDTH = 25
_LEGEND = (
    "held-out, teacher-forced: loss = caption cross-entropy per token (nats); tok acc = argmax accuracy over the "
    "caption; content / colour / shape / position = on those words only; unseen = content accuracy on "
    "colour-shape-position combinations never trained on. MIR: lower = vision closer to text. |v|/|t| in: "
    "vision / text token norm at the LLM input. cos v: vision tokens' mean cosine between adjacent layers "
    "(1 = layers leave them unchanged). train s: stage-1 wall seconds per variant."
)


def _value(row: Mapping[str, Any], key: str) -> Any:
    return row[key] if key in row else row.get("summary", {}).get(key)


def _std(row: Mapping[str, Any], key: str) -> float | None:
    return row.get("std", {}).get(key)


def _fmt(value: Any, spec: str, std: float | None = None) -> str:
    if value is None:
        return "-"
    value = float(value)
    text = format(value, spec) if math.isfinite(value) else str(value)
    return text if std is None else f"{text} ± {format(std, spec)}"


def _keys(variants: Mapping[str, Any]) -> list[str]:
    return [k for k in COLUMNS if any(_value(row, k) is not None for row in variants.values())]


def format_table(results: Mapping[str, Any]) -> str:
    """One row per variant, the columns of :data:`COLUMNS` that the results hold (mean ± std when a row
    has ``std``), a legend line, and the spread sentence when there are several seeds."""
    variants = results["variants"]
    keys = _keys(variants)
    cells = {n: [_fmt(_value(row, k), COLUMNS[k][1], _std(row, k)) for k in keys] for n, row in variants.items()}
    widths = [max(len(COLUMNS[k][0]), 7, *(len(c[j]) for c in cells.values())) for j, k in enumerate(keys)]
    head = f"{'variant':<{_NAME_WIDTH}}" + "".join(f" {COLUMNS[k][0]:>{w}}" for k, w in zip(keys, widths, strict=True))
    lines = [head, "-" * len(head)]
    for name, row_cells in cells.items():
        lines.append(f"{name:<{_NAME_WIDTH}}" + "".join(f" {c:>{w}}" for c, w in zip(row_cells, widths, strict=True)))
    sentence = spread_sentence(results)
    return "\n".join([*lines, "", _LEGEND, *([sentence] if sentence else [])])


def spread_sentence(results: Mapping[str, Any], reference: str = "baseline") -> str:
    """Which differences to ``reference`` exceed the spread over seeds, in words.

    A difference of means counts when it is larger than the two standard deviations added (the stds
    are over seeds, n - 1). Empty when the rows carry no std (one seed) or ``reference`` is missing.

    Example:
        >>> rows = {"baseline": {"mir": 3.0, "std": {"mir": 0.1}}, "ln": {"mir": 0.6, "std": {"mir": 0.05}}}
        >>> spread_sentence({"variants": rows, "seeds": [0, 1, 2]}).split(": ")[1]
        'ln MIR -2.400. All other differences are within the spread.'
    """
    variants = results["variants"]
    if reference not in variants or _std(variants[reference], SPREAD_KEYS[-1]) is None:
        return ""
    base = variants[reference]
    found = []
    for name, row in variants.items():
        if name == reference:
            continue
        for key in SPREAD_KEYS:
            a, b, sa, sb = _value(row, key), _value(base, key), _std(row, key), _std(base, key)
            if None in (a, b, sa, sb) or not all(math.isfinite(float(x)) for x in (a, b, sa, sb)):
                continue
            if abs(a - b) > sa + sb:
                found.append(f"{name} {COLUMNS[key][0]} {a - b:+{COLUMNS[key][1]}}")
    seeds = len(results.get("seeds", [])) or "several"
    if not found:
        return f"Over {seeds} seeds, no difference to {reference} exceeds the two spreads added."
    return (
        f"Over {seeds} seeds, differences to {reference} larger than the two spreads added: {'; '.join(found)}. "
        "All other differences are within the spread."
    )


def _strict(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become "nan" / "inf" strings (as the library's reports do)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Running mean over the last ``window`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_training(results: Mapping[str, Any]) -> Any:
    """Stage-1 caption loss per variant (running mean) and the PRe loss where it is on; a Figure.

    Plain y axes: the interesting part is the last few tenths, which a log axis would squeeze."""
    variants = results["variants"]
    styles = plots.variant_styles(list(variants))
    fig, (ax_lm, ax_pre) = plots.figure(2, width=5.6)
    for name, row in variants.items():
        s = styles[name]
        line = {"color": s["color"], "ls": s["ls"], "lw": s["lw"] * 0.7, "marker": s["marker"], "mfc": "none"}
        for ax, key in ((ax_lm, "loss"), (ax_pre, "pre_loss")):
            values = row["history"][key]
            if values:
                window = max(1, len(values) // 25)
                every = max(1, len(values) // 8)
                ax.plot(range(1, len(values) + 1), _smooth(values, window), **line, markevery=every, label=name)
    tail = [
        v for row in variants.values() for v in _smooth(row["history"]["loss"], 1)[len(row["history"]["loss"]) // 10 :]
    ]
    if tail:  # the first tenth of the steps falls from the LLM's guess: leave it off the top
        ax_lm.set_ylim(0, max(tail) * 1.05)
    plots.finish(ax_lm, "Stage-1 caption loss (train, running mean)", "step", "cross-entropy (nats / token)")
    plots.finish(ax_pre, "PRe loss (1 - cos), variants with PRe", "step", "PRe loss")
    return fig


def plot_examples(examples: Sequence[Mapping[str, Any]], images: Sequence[Any]) -> Any:
    """Held-out images with their captions, three per row (legible on a phone); a Figure."""
    ncols = min(3, len(images))
    fig, axes = plots.figure(ncols, nrows=math.ceil(len(images) / ncols), width=1.9, height=2.3)
    for ax in axes[len(images) :]:
        ax.set_axis_off()
    for i, (ax, example, image) in enumerate(zip(axes, examples, images, strict=False)):
        ax.imshow(image)
        ax.set_axis_off()
        title = example["caption"].removeprefix("a ").removesuffix(" .").replace(" at the ", "\n")
        ax.set_title(f"image {i + 1}\n{title}" + ("\n(unseen combination)" if example["unseen"] else ""), fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------------


def _marked(generated: str, truth: str) -> Raw:
    """The generated caption with the words that differ from the true caption (same position) marked."""
    expected = truth.split()
    words = [
        html.escape(w) if i < len(expected) and w == expected[i] else f'<span class="wrong">{html.escape(w)}</span>'
        for i, w in enumerate(generated.split())
    ]
    return Raw(" ".join(words))


def _results_table(results: Mapping[str, Any]) -> str:
    variants = results["variants"]
    keys = _keys(variants)
    names = list(variants)
    best = set()
    for j, key in enumerate(keys, start=1):
        direction = COLUMNS[key][2]
        values = [_value(variants[n], key) for n in names]
        if direction and (i := best_row([math.nan if v is None else float(v) for v in values], direction)) is not None:
            best.add((i, j))
    rows = [[n, *(_fmt(_value(variants[n], k), COLUMNS[k][1], _std(variants[n], k)) for k in keys)] for n in names]
    return table(["variant", *(COLUMNS[k][0] for k in keys)], rows, best=best)


def _samples_table(results: Mapping[str, Any]) -> str:
    names = list(results["variants"])
    rows = [
        [
            f"image {i + 1}",
            ex["caption"],
            *(_marked(results["variants"][n]["samples"][i], ex["caption"]) for n in names),
        ]
        for i, ex in enumerate(results["examples"])
    ]
    return table(["", "true caption", *names], rows, text_columns=range(1, len(names) + 2))


def _spread_text(results: Mapping[str, Any]) -> str:
    seeds = results.get("seeds", [results["config"]["seed"]])
    if len(seeds) < 2:
        return (
            "One seed: each number is one run, and no spread was measured (a quick run stays within its time "
            "budget). Run <code>normalign demo --seeds 3</code> for mean ± std over seeds; in the runs of "
            "docs/demo.md, seeds moved these numbers by a few hundredths."
        )
    return html.escape(
        f"Mean ± std over seeds {', '.join(map(str, seeds))} (each seed: its own data, base model and "
        f"initialisation). {spread_sentence(results)}"
    )


def _timing_rows(results: Mapping[str, Any]) -> list[list[str]]:
    seeds = len(results.get("seeds", [0]))
    per = f" (sum over {seeds} seeds)" if seeds > 1 else ""
    return [[f"{phase}{per}", f"{seconds:.1f}"] for phase, seconds in results["timing_seconds"].items()]


def _html(results: Mapping[str, Any], figures: Mapping[str, tuple[bytes, str]], out_dir: Path) -> str:
    config, base, data, check = results["config"], results["base"], results["data"], results["checkpoint"]
    env, variants = results["environment"], results["variants"]
    seeds = results.get("seeds", [config["seed"]])
    ok = '<span class="ok">EQUAL</span>' if check["equal"] else '<span class="bad">DIFFERENT</span>'
    diag = out_dir / "diagnostics"
    diagnostics = {
        "norms": {n: row["profile"] for n, row in variants.items()},
        "update_rate": {n: row["profile"] for n, row in variants.items()},
        "mir": {n: row["mir_per_layer"] for n, row in variants.items()},
    }
    load = env["load_average"]
    load_text = "n/a" if load is None else ", ".join(f"{x:.1f}" for x in load) + " (1, 5, 15 min)"
    subtitle = (
        f"{len(variants)} variants · {config['steps']} stage-1 steps each · seed{'s' * (len(seeds) > 1)} "
        f"{', '.join(map(str, seeds))} · torch {env['torch']}, transformers {env['transformers']}, "
        f"hf-normalign {env['hf_normalign']}"
    )
    sections = [
        section(
            "task",
            "The task",
            "<p>Each image shows one coloured shape at one of five positions; the caption follows from the image. "
            f"Stage-1 trains on {data['train_images']} images; the numbers below are on {data['heldout_images']} "
            f"held-out images, {data['heldout_unseen_combination_images']} of them showing colour-shape-position "
            "combinations never seen in training. The model is a real <code>LlavaForConditionalGeneration</code>: "
            "a frozen random CLIP tower whose features are loud (as in real VLMs), a 2-layer MLP projector, and a "
            "small llama LLM pre-trained on text alone, frozen during stage-1.</p>",
            figure(*figures["examples"], "Held-out images and their true captions.", href="examples.png"),
            f"<p class='caption'>Greedy captions each variant writes for these images (seed {seeds[0]}); words "
            "that differ from the true caption are marked <span class='wrong'>like this</span>.</p>",
            _samples_table(results),
        ),
        section(
            "results",
            "Results",
            _results_table(results),
            "<p class='caption'>Underlined bold: the best value of its column (|v|/|t| in: closest to 1).</p>",
            f"<p class='caption'>{html.escape(_LEGEND)}</p>",
            f"<p>{_spread_text(results)}</p>",
            "<p class='caption'>Printed as measured, no selection. A miniature: it shows the mechanics the papers "
            "describe (the norm gap, the vision tokens' inertia, MIR) and the code paths working end to end; it "
            "does not rank the methods or reproduce the papers' benchmark gains (docs/demo.md says more).</p>",
        ),
        section(
            "training",
            "Stage-1 training",
            figure(
                *figures["training"],
                f"Left: caption loss on the training batches (seed {seeds[0]}), a running mean over 4% of the steps; "
                "the y axis starts at 0 and leaves off the first tenth of the steps. Right: the PRe loss "
                "(1 - cosine, before its weight 0.5) of the variants with PRe. Look at where the curves end and "
                "whether they still fall.",
                href="training.png",
            ),
        ),
        section(
            "diagnostics",
            "Norms, update rate and MIR",
            "<p class='caption'>Computed by <code>hf_normalign.diagnostics.build_report</code> on "
            f"{data['probe_samples']} held-out images, each paired with an unrelated text passage (seed "
            f'{seeds[0]}); per-layer numbers in <a href="diagnostics/report.html">diagnostics/report.html</a>.</p>',
            *(
                figure(
                    (diag / f"{stem}.png").read_bytes(),
                    f"{stem} plot of the variants",
                    plot_caption(stem, per_model),
                    href=f"diagnostics/{stem}.png",
                )
                for stem, per_model in diagnostics.items()
            ),
        ),
        section(
            "base",
            "Base model before stage-1",
            table(
                ["quantity", "value"],
                [
                    [
                        "text embedding norm (mean row L2, the projector LayerNorm's target)",
                        f"{base['text_embedding_norm']:.3f}",
                    ],
                    ["vision features entering the projector (mean L2)", f"{base['vision_feature_norm']:.1f}"],
                    [
                        "projector output at init = vision tokens entering the LLM (mean L2)",
                        f"{base['projector_output_norm']:.1f}",
                    ],
                    [
                        "ratio vision tokens / text embeddings at init",
                        f"{base['projector_output_norm'] / base['text_embedding_norm']:.0f}",
                    ],
                    [
                        "text pre-training loss (nats / token), first / last step",
                        f"{base['text_pretraining_loss'][0]:.2f} / {base['text_pretraining_loss'][-1]:.2f}",
                    ],
                ],
                text_columns=[0],
            ),
            f"<p class='caption'>Seed {seeds[0]}.</p>",
        ),
        section(
            "checkpoint",
            "Checkpoint",
            f'<p>"{html.escape(check["variant"])}" (seed {seeds[0]}) saved with <code>save_pretrained</code> to '
            f"<code>{html.escape(check['path'])}</code> and reloaded with <code>normalign.from_pretrained</code> "
            f"(methods {html.escape(', '.join(check['methods']))}): logits on {check['batch_size']} held-out "
            f"samples {ok} (max |diff| {check['max_abs_diff']:.3g}).</p>",
        ),
        section(
            "timing",
            "Run",
            table(["phase", "wall seconds"], _timing_rows(results), text_columns=[0]),
            f"<p class='caption'>Wall-clock seconds of each phase. Evaluation = teacher-forced held-out metrics of "
            f"every variant; greedy captions = the example captions above. {env['cpu_count']} CPUs, "
            f"{env['torch_threads']} torch thread(s), load average at the end {html.escape(load_text)}: on a "
            "shared machine, compare nothing by these times.</p>",
        ),
        glossary(
            [
                "projector LayerNorm",
                "GWC",
                "MoCa",
                "PRe",
                "FID",
                "MIR",
                "layer numbering",
                "final norm",
                "update rate",
                "units",
                "mean ± std",
            ]
        ),
    ]
    return page(
        "hf-normalign demo: stage-1 alignment in miniature",
        subtitle,
        sections,
        links={"diagnostics report": "diagnostics/report.html"},
        created=results.get("created"),
    )


def write_report(results: Mapping[str, Any], out_dir: Path, images: Sequence[Any]) -> tuple[Path, Path]:
    """Write ``results.json``, ``report.html`` and its own plots (``training.png``, ``examples.png``) into
    ``out_dir``; ``images``: the example images (PIL). The diagnostics plots come from ``out_dir/diagnostics``."""
    results_json = out_dir / "results.json"
    write_file_atomically(results_json, json.dumps(_strict(results), indent=1, allow_nan=False) + "\n")
    figures = {
        "training": (plots.png_bytes(plot_training(results), out_dir / "training.png"), "stage-1 loss curves"),
        "examples": (
            plots.png_bytes(plot_examples(results["examples"], images), out_dir / "examples.png"),
            "held-out example images with their captions",
        ),
    }
    report = out_dir / "report.html"
    write_file_atomically(report, _html(results, figures, out_dir))
    return report, results_json
