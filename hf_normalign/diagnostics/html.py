"""The HTML both reports are made of: page shell with CSS, tables, figures, glossary, number formats.

Used by :mod:`hf_normalign.diagnostics.report` (``normalign report``) and :mod:`hf_normalign.demo.report`
(``normalign demo``). The pages are self-contained (CSS inline, plots embedded as base64 PNG, no scripts)
and read at any width: a viewport tag, tables that scroll inside their card, plots that scale down and
link to their full-size PNG (written at 2x, shown at half size).

Example:
    >>> rows = [["a", "0.50"], ["b", "0.25"]]
    >>> body = section("numbers", "Numbers", table(["name", "loss"], rows, best={(1, 1)}))
    >>> page_html = page("My report", "two rows", [body])
    >>> '<meta name="viewport"' in page_html and '<td class="best">0.25</td>' in page_html
    True
"""

from __future__ import annotations

import base64
import html
import math
import struct
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CSS",
    "GLOSSARY",
    "Raw",
    "best_row",
    "column_decimals",
    "figure",
    "format_fixed",
    "glossary",
    "page",
    "section",
    "table",
]

# Sizes in px, none below 12 (the rendering test fails under 11); at most 720 px wide a card loses its
# side padding so a phone keeps its width for the content.
CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2329;
font-size:15px;line-height:1.45}
header{background:#1d2d44;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;opacity:.85;font-size:13px}header a{color:#cfe0ff}
main{max-width:1180px;margin:0 auto;padding:16px 32px 48px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);margin:18px 0;padding:14px 20px}
h2{font-size:18px;margin:4px 0 6px}p,li,dd{font-size:14px}.caption,figcaption{color:#4a5560;font-size:13px}
figure{margin:10px 0 18px}figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{margin-top:4px}
.scroll{overflow-x:auto;max-width:100%;margin:8px 0}
table{border-collapse:collapse;font-size:13px}th,td{padding:3px 9px;text-align:right;white-space:nowrap}
th{background:#eef1f4}tr:nth-child(even) td{background:#fafbfc}td:first-child,th:first-child{text-align:left}
td.text,th.text{text-align:left;white-space:normal;min-width:11em}td.best{font-weight:700;text-decoration:underline}
td.na{color:#6b7580}.ok{color:#17803d;font-weight:600}.bad{color:#b42318;font-weight:600}
.wrong{color:#b42318;text-decoration:underline wavy}
code{background:#eef1f4;padding:0 3px;overflow-wrap:anywhere}details{margin:6px 0}
summary{cursor:pointer;color:#2a5d9f;font-size:14px}dt{font-weight:600;font-size:14px;margin-top:8px}
dd{margin:2px 0 0 16px}
@media (max-width:720px){header{padding:14px 14px}main{padding:8px 8px 32px}section{padding:12px 12px}
header h1{font-size:19px}}
"""

# Every name a reader meets in either report, in plain words. The reports show the terms they use.
GLOSSARY: dict[str, str] = {
    "projector LayerNorm": "A LayerNorm on the projector's output, so vision tokens enter the LLM at the "
    "text embeddings' norm instead of tens to hundreds of times louder (variant projector_norm).",
    "GWC": "Global Weight Compensation: the projector LayerNorm's gain starts small (text embedding norm / "
    "sqrt(hidden size)), which would shrink the gradient reaching the projector by the same factor; in "
    "training GWC divides that gradient by the gain's mean size. projector_norm (no GWC) has the same "
    "LayerNorm without it.",
    "MoCa": "Modality Calibration: a learned scale and shift (initialised to identity) applied to the vision "
    "positions after every decoder layer (variant moca).",
    "PRe": "Predictive Regularization: a small head on a middle decoder layer predicts the LLM-input vision "
    "embeddings; its loss (1 - cosine) is added to the caption loss (variant pre).",
    "FID": "Fréchet distance between the vision tokens and the text tokens of one layer, each modelled as a "
    "Gaussian (mean and covariance), after scaling both by 1 / the text tokens' mean norm (so unitless); "
    "0 = same distribution.",
    "MIR": "Modality Integration Rate: log10 of the sum of the per-layer FIDs. Lower = vision tokens closer "
    "to text tokens; a drop of 1 is a 10x smaller summed distance.",
    "layer numbering": "Layer 0 is the LLM input (the embeddings, vision tokens as the projector writes them); "
    "layer k is the hidden state after decoder layer k. MIR and FID start at layer 1; the update rate of "
    "decoder layer l compares layer l-1 with layer l.",
    "final norm": "The LLM's last RMSNorm. The norm profiles show the last layer before it (it would rescale "
    "every token to about its weight and hide the norm gap); MIR takes the last layer after it, as "
    "transformers reports hidden states. So a large gap at the second-to-last layer can fall sharply at "
    "the last one: that drop is the final norm, not the model's last layer integrating the modalities.",
    "update rate": "Mean cosine between a token's hidden state before and after one decoder layer. Near 1 = "
    "the layer hardly turns the token (the inertia of loud vision tokens); text tokens are usually lower.",
    "MMD²": "Squared maximum mean discrepancy (RBF kernel) between vision and text attention keys; the "
    "'halves' lines compare two random halves of one modality, the value with no gap at all.",
    "JSD": "Jensen-Shannon divergence between histograms of vision and text keys on shared principal "
    "components (base 2 by default: 0 = same, 1 = disjoint).",
    "units": "Norms: L2 norm of a hidden-state vector (the model's own units). Loss: cross-entropy per "
    "caption token in nats (ln). Accuracies: fraction correct, 0-1. Seconds: wall-clock time on the "
    "machine of the run, which other jobs may share.",
    "mean ± std": "Mean over seeds ± their standard deviation (n - 1 in the denominator): the spread another "
    "seed would give. A difference smaller than the two spreads added is not a finding.",
    "vision path norms": "Mean L2 norm of the rows at four points (the norm paper's measurements): the "
    "vision encoder's output as the projector receives it, the projector's output before the projector "
    "LayerNorm, the vision tokens at the LLM input (after it), and the text-passage embeddings. Without "
    "the LayerNorm the last two differ by the norm gap; with it the vision tokens enter near the text scale.",
    "LayerNorm gain": "The projector LayerNorm's per-dimension gain g (D entries). It starts at T / sqrt(D) "
    "in every entry (T = mean norm of the text embeddings), so mean |g| / init and ||g|| / T are 1 until "
    "training moves the gain; GWC scale = 1 / mean |g| (floored), the factor GWC multiplies the "
    "projector's gradient by.",
    "t-SNE": "A 2-D map of the keys that keeps each point's nearest neighbours (scikit-learn, seeded). Two "
    "separate clouds = the keys separate the modalities; cloud sizes and the distance between clouds carry "
    "no meaning, unlike the PCA scatter.",
}


LINK_SCHEMES = ("http", "https")


def safe_href(href: str) -> str:
    """``href`` if it is an http(s) URL or a relative reference (``../report.html``, ``#mir``); ``ValueError``
    naming it otherwise: a ``javascript:``, ``data:`` or ``file:`` link in a report would run or open whatever it
    names when clicked."""
    if not isinstance(href, str) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in href):
        raise ValueError(f"link {href!r}: a link must be a string without control characters")
    parts = urllib.parse.urlsplit(href.strip())  # browsers ignore surrounding spaces too
    if (parts.scheme.lower() in LINK_SCHEMES and parts.netloc) or not (parts.scheme or parts.netloc):
        return href
    raise ValueError(
        f"link {href!r}: only http(s) URLs and relative paths are allowed in a report (e.g. https://example.org/run "
        "or ../report.html)"
    )


class Raw(str):
    """Text that is already HTML: :func:`table` and :func:`section` insert it unescaped."""


def _esc(value: Any) -> str:
    return value if isinstance(value, Raw) else html.escape(str(value))


def page(
    title: str,
    subtitle: str | Raw,
    sections: Iterable[str],
    *,
    links: Mapping[str, str] | None = None,
    created: str | None = None,
) -> str:
    """The whole document: head (charset, viewport, CSS), a header with ``title``, ``subtitle``, the
    creation time and ``links`` (label -> href), then ``sections`` (HTML strings) inside ``<main>``."""
    extra = []
    if created:
        extra.append(f"created {html.escape(created)}")
    extra += [
        f'<a href="{html.escape(safe_href(href))}">{html.escape(label)}</a>' for label, href in (links or {}).items()
    ]
    meta = f"<p>{' &middot; '.join(extra)}</p>" if extra else ""
    return (
        "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                '<meta name="viewport" content="width=device-width, initial-scale=1">',
                f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
                f"<header><h1>{html.escape(title)}</h1><p>{_esc(subtitle)}</p>{meta}</header><main>",
                *sections,
                "</main></body></html>",
            ]
        )
        + "\n"
    )


def section(section_id: str, heading: str, *parts: str) -> str:
    """A card: ``<section id=...><h2>heading</h2>...parts...</section>`` (parts are HTML)."""
    return f'<section id="{html.escape(section_id)}"><h2>{html.escape(heading)}</h2>{"".join(parts)}</section>'


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    text_columns: Iterable[int] = (),
    best: Iterable[tuple[int, int]] = (),
    missing: str = "–",
) -> str:
    """A table inside a horizontally scrolling box. Cells are text (escaped) or :class:`Raw` HTML; None
    shows ``missing`` greyed. ``text_columns``: columns of sentences (left-aligned, wrapped);
    ``best``: (row, column) cells marked as the best of their column (bold, underlined)."""
    text, marked = set(text_columns), set(best)

    def cell(i: int, j: int, value: Any) -> str:
        classes = ["text"] * (j in text) + ["best"] * ((i, j) in marked) + ["na"] * (value is None)
        attr = f' class="{" ".join(classes)}"' if classes else ""
        return f"<td{attr}>{_esc(missing if value is None else value)}</td>"

    text_class = ' class="text"'
    head = "".join(f"<th{text_class if j in text else ''}>{_esc(h)}</th>" for j, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell(i, j, v) for j, v in enumerate(row)) + "</tr>" for i, row in enumerate(rows))
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("figure() needs PNG bytes")
    return struct.unpack(">II", data[16:24])


def figure(png: bytes, alt: str, caption: str | Raw, *, href: str | None = None, file: str | None = None) -> str:
    """A plot: the PNG embedded (base64) at half its pixel size (it is drawn at 2x), scaling down with the
    page, linked to ``href`` (the PNG file, full size) when given, with ``caption`` below.
    ``file`` is kept in ``data-file`` (the PNG file the image came from)."""
    width, height = _png_size(png)
    data = base64.b64encode(png).decode("ascii")
    attrs = f' data-file="{html.escape(file)}"' if file else ""
    img = (
        f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" width="{width // 2}" '
        f'height="{height // 2}"{attrs}>'
    )
    if href:
        img = f'<a href="{html.escape(safe_href(href))}" title="full size">{img}</a>'
    return f"<figure>{img}<figcaption>{_esc(caption)}</figcaption></figure>"


def glossary(terms: Iterable[str]) -> str:
    """The glossary section for ``terms`` (keys of :data:`GLOSSARY`), in that order."""
    items = "".join(f"<dt>{html.escape(t)}</dt><dd>{html.escape(GLOSSARY[t])}</dd>" for t in terms)
    return section("glossary", "Glossary", f"<dl>{items}</dl>")


def column_decimals(values: Iterable[Any], significant: int = 3, most: int = 4) -> int:
    """One count of decimals for a whole column, so its decimal points line up: enough for ``significant``
    digits of the largest finite magnitude and two of the smallest non-zero one (0..``most``).

    Example:
        >>> column_decimals([84.2, 1.5]), column_decimals([0.6363, 0.12]), column_decimals([159.4, 1.2])
        (1, 3, 1)
    """
    finite = [abs(float(v)) for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v != 0]
    if not finite:
        return 0
    need = max(significant - 1 - math.floor(math.log10(max(finite))), 1 - math.floor(math.log10(min(finite))))
    return min(most, max(0, need))


def format_fixed(value: Any, decimals: int) -> str | None:
    """``value`` with ``decimals`` decimals; None stays None, non-finite floats and strings as text."""
    if value is None:
        return None
    if isinstance(value, str) or not math.isfinite(value):
        return str(value)
    return f"{value:.{decimals}f}"


def best_row(values: Sequence[Any], direction: str) -> int | None:
    """Index of the best finite value: ``"min"``, ``"max"``, or ``"one"`` (ratio closest to 1 on a log
    scale); None when fewer than two values are finite or the best is tied.

    Example:
        >>> best_row([3.0, 0.9, 1.5], "one"), best_row([0.2, 0.5], "max"), best_row([1.0, 1.0], "min")
        (1, 1, None)
    """
    if direction not in ("min", "max", "one"):
        raise ValueError(f"direction must be 'min', 'max' or 'one', got {direction!r}")
    scored = []
    for i, v in enumerate(values):
        if isinstance(v, (int, float)) and math.isfinite(v) and (direction != "one" or v > 0):
            scored.append((abs(math.log(v)) if direction == "one" else (-v if direction == "max" else v), i))
    if len(scored) < 2:
        return None
    scored.sort()
    return None if scored[0][0] == scored[1][0] else scored[0][1]
