"""The demo's outputs: the terminal table, ``results.json`` and the self-contained ``report.html``.

``report.html`` holds the task (example images with their captions and what each variant writes for them),
the results table, the stage-1 loss curves, the norm / update-rate / MIR plots of the library's diagnostics
report (``diagnostics/report.html`` has their per-layer numbers), the base model's scales and the checkpoint
check. Images are embedded as base64 PNG, so the page opens anywhere, offline.

Example:
    >>> rows = {"baseline": {"caption_loss": 0.5, "token_accuracy": 0.7, "content_accuracy": 0.4}}
    >>> for line in format_table({"variants": rows}).splitlines()[:3]:
    ...     print(line)
    variant                      loss tok acc content
    -------------------------------------------------
    baseline                    0.500   0.700   0.400
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "format_table", "write_report"]

# results key -> (column header, format); summary keys come from the diagnostics report.
COLUMNS: dict[str, tuple[str, str]] = {
    "caption_loss": ("loss", ".3f"),
    "token_accuracy": ("tok acc", ".3f"),
    "content_accuracy": ("content", ".3f"),
    "colour_accuracy": ("colour", ".3f"),
    "shape_accuracy": ("shape", ".3f"),
    "position_accuracy": ("position", ".3f"),
    "unseen_content_accuracy": ("unseen", ".3f"),
    "mir": ("MIR", ".3f"),
    "norm_ratio_input": ("|v|/|t| in", ".1f"),
    "vision_update_cos_mean": ("cos v", ".4f"),
    "train_seconds": ("train s", ".0f"),
}
_NAME_WIDTH = 25
_LEGEND = (
    "held-out, teacher-forced: loss = caption cross-entropy per token; tok acc = argmax accuracy over the caption; "
    "content / colour / shape / position = on those words only; unseen = content accuracy on colour-shape-position "
    "combinations never trained on. MIR: lower = vision closer to text. |v|/|t| in: vision / text token norm at "
    "the LLM input. cos v: vision tokens' mean cosine between adjacent layers (1 = layers leave them unchanged)."
)


def _value(row: Mapping[str, Any], key: str) -> Any:
    return row[key] if key in row else row.get("summary", {}).get(key)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    value = float(value)
    return format(value, spec) if math.isfinite(value) else str(value)


def format_table(results: Mapping[str, Any]) -> str:
    """One row per variant, the columns of :data:`COLUMNS` that the results hold, and a legend line."""
    variants = results["variants"]
    keys = [k for k in COLUMNS if any(_value(row, k) is not None for row in variants.values())]
    widths = {k: max(len(COLUMNS[k][0]), 7) for k in keys}
    head = f"{'variant':<{_NAME_WIDTH}}" + "".join(f" {COLUMNS[k][0]:>{widths[k]}}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, row in variants.items():
        cells = "".join(f" {_fmt(_value(row, k), COLUMNS[k][1]):>{widths[k]}}" for k in keys)
        lines.append(f"{name:<{_NAME_WIDTH}}{cells}")
    return "\n".join([*lines, "", _LEGEND])


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


def _png(fig: Any) -> bytes:
    from ..diagnostics.plots import _plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _plt().close(fig)
    return buffer.getvalue()


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Running mean over the last ``window`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_training(results: Mapping[str, Any]) -> bytes:
    """Stage-1 caption loss per variant (running mean) and the PRe loss where it is on; PNG bytes."""
    from ..diagnostics.plots import _colors, _figure, _finish

    variants = results["variants"]
    colors = _colors(list(variants))
    fig, (ax_lm, ax_pre) = _figure(2, width=5.6)
    for name, row in variants.items():
        loss = row["history"]["loss"]
        window = max(1, len(loss) // 25)
        ax_lm.plot(range(1, len(loss) + 1), _smooth(loss, window), color=colors[name], label=name, lw=1.5)
        if row["history"]["pre_loss"]:
            pre = row["history"]["pre_loss"]
            ax_pre.plot(range(1, len(pre) + 1), _smooth(pre, window), color=colors[name], label=name, lw=1.5)
    ax_lm.set_yscale("log")
    _finish(ax_lm, "stage-1 caption loss (train, running mean)", "step", "cross-entropy")
    _finish(ax_pre, "PRe loss (1 - cos), variants with PRe", "step", "PRe loss")
    return _png(fig)


def plot_examples(examples: Sequence[Mapping[str, Any]], images: Sequence[Any]) -> bytes:
    """Held-out images with their captions; PNG bytes."""
    from ..diagnostics.plots import _figure

    fig, axes = _figure(len(images), width=1.9, height=2.1)
    for ax, example, image in zip(axes, examples, images, strict=True):
        ax.imshow(image)
        ax.set_axis_off()
        title = example["caption"].removeprefix("a ").removesuffix(" .").replace(" at the ", "\n")
        ax.set_title(title + ("\n(unseen combination)" if example["unseen"] else ""), fontsize=8)
    return _png(fig)


# ----------------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2329}
header{background:#1d2d44;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.85;font-size:13px}main{max-width:1180px;margin:0 auto;padding:16px 32px 48px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);margin:18px 0;padding:14px 20px}
h2{font-size:18px;margin:4px 0 6px}p,li{font-size:14px;line-height:1.45}.caption{color:#4a5560;font-size:13px}
img{max-width:100%;height:auto;display:block;margin:6px auto}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0}th,td{padding:3px 9px;text-align:right}
th{background:#eef1f4}tr:nth-child(even) td{background:#fafbfc}td:first-child,th:first-child{text-align:left}
.ok{color:#17803d;font-weight:600}.bad{color:#b42318;font-weight:600}code{background:#eef1f4;padding:0 3px}
"""


def _img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _results_table(results: Mapping[str, Any]) -> str:
    variants = results["variants"]
    keys = [k for k in COLUMNS if any(_value(row, k) is not None for row in variants.values())]
    rows = [[name, *(_fmt(_value(row, k), COLUMNS[k][1]) for k in keys)] for name, row in variants.items()]
    return _table(["variant", *(COLUMNS[k][0] for k in keys)], rows)


def _samples_table(results: Mapping[str, Any]) -> str:
    examples = results["examples"]
    rows = [[f"image {i + 1}", ex["caption"], *(results["variants"][n]["samples"][i] for n in results["variants"])]
            for i, ex in enumerate(examples)]  # fmt: skip
    return _table(["", "true caption", *results["variants"]], rows)


def _html(results: Mapping[str, Any], figures: Mapping[str, bytes], diagnostics: Mapping[str, Path]) -> str:
    config, base, data, check = results["config"], results["base"], results["data"], results["checkpoint"]
    env = results["environment"]
    ok = '<span class="ok">EQUAL</span>' if check["equal"] else '<span class="bad">DIFFERENT</span>'
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>hf-normalign demo</title>',
        f"<style>{_CSS}</style></head><body>",
        "<header><h1>hf-normalign demo: stage-1 alignment in miniature</h1>"
        f"<p>{len(results['variants'])} variants &middot; {config['steps']} stage-1 steps each, seed {config['seed']}"
        f" &middot; torch {html.escape(env['torch'])}, transformers {html.escape(env['transformers'])}, "
        f"hf-normalign {html.escape(env['hf_normalign'])}</p></header><main>",
        '<section id="task"><h2>The task</h2>'
        "<p>Each image shows one coloured shape at one of five positions; the caption follows from the image. "
        f"Stage-1 trains on {data['train_images']} images; the numbers below are on {data['heldout_images']} "
        f"held-out images, {data['heldout_unseen_combination_images']} of them showing colour-shape-position "
        "combinations never seen in training. The model is a real <code>LlavaForConditionalGeneration</code>: "
        "a frozen random CLIP tower whose features are loud (as in real VLMs), a 2-layer MLP projector, and a "
        "small llama LLM pre-trained on text alone, frozen during stage-1.</p>",
        _img(figures["examples"], "held-out examples"),
        "<p class='caption'>Greedy captions each variant writes for these held-out images:</p>",
        _samples_table(results),
        "</section>",
        f'<section id="results"><h2>Results</h2>{_results_table(results)}'
        f"<p class='caption'>{html.escape(_LEGEND)}</p>"
        "<p class='caption'>Printed as measured: one seed, one run, no selection. Differences of a few "
        "hundredths between variants are within what another seed would change. A miniature: it shows the "
        "mechanics the papers describe (the norm gap, the vision tokens' inertia, MIR) and the code paths "
        "working end to end; it does not rank the methods or reproduce the papers' benchmark gains "
        "(docs/demo.md says more).</p></section>",
        f'<section id="training"><h2>Stage-1 training</h2>{_img(figures["training"], "training curves")}</section>',
        '<section id="diagnostics"><h2>Norms, update rate and MIR</h2>'
        "<p class='caption'>Computed by <code>hf_normalign.diagnostics.build_report</code> on "
        f"{data['probe_samples']} held-out images, each paired with an unrelated text passage; per-layer numbers "
        'in <a href="diagnostics/report.html">diagnostics/report.html</a>.</p>',
        *(_img(path.read_bytes(), stem) for stem, path in diagnostics.items()),
        "</section>",
        '<section id="base"><h2>Base model before stage-1</h2>',
        _table(
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
                    "text pre-training loss, first / last step",
                    f"{base['text_pretraining_loss'][0]:.2f} / {base['text_pretraining_loss'][-1]:.2f}",
                ],
            ],
        ),
        "</section>",
        f'<section id="checkpoint"><h2>Checkpoint</h2><p>"{html.escape(check["variant"])}" saved with '
        f"<code>save_pretrained</code> to <code>{html.escape(check['path'])}</code> and reloaded with "
        f"<code>normalign.from_pretrained</code> (methods {html.escape(', '.join(check['methods']))}): logits "
        f"on {check['batch_size']} held-out samples {ok} (max |diff| {check['max_abs_diff']:.3g}).</p></section>",
        '<section id="timing"><h2>Run</h2>',
        _table(["phase", "seconds"], [[k, f"{v:.1f}"] for k, v in results["timing_seconds"].items()]),
        f"<p class='caption'>{env['cpu_count']} CPUs, load average at the end "
        f"{html.escape(str(env['load_average']))}, {env['torch_threads']} torch thread(s).</p></section>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(results: Mapping[str, Any], out_dir: Path, images: Sequence[Any]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.html`` into ``out_dir``; ``images``: the example images (PIL)."""
    results_json = out_dir / "results.json"
    results_json.write_text(json.dumps(_strict(results), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    figures = {"training": plot_training(results), "examples": plot_examples(results["examples"], images)}
    diagnostics = {stem: out_dir / "diagnostics" / f"{stem}.png" for stem in ("norms", "update_rate", "mir")}
    report = out_dir / "report.html"
    report.write_text(_html(results, figures, diagnostics), encoding="utf-8")
    return report, results_json
