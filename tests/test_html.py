"""The shared report HTML: tables that scroll and mark the best cell, figures at half their pixel size with a
link, fixed decimals per column, the glossary, the page shell."""

import html
import io
import re

import pytest
from PIL import Image

from hf_normalign.diagnostics import html as report_html


def _png(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def test_page_has_viewport_charset_and_links():
    text = report_html.page("T <1>", "sub", ["<section>x</section>"], links={"back": "../r.html"}, created="now")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
    assert "<title>T &lt;1&gt;</title>" in text and '<a href="../r.html">back</a>' in text and "created now" in text
    assert text.index("<main>") < text.index("<section>x</section>") < text.index("</main>")


def test_table_scrolls_escapes_and_marks():
    out = report_html.table(["a", "b"], [["<x>", None], [report_html.Raw("<i>y</i>"), "2.0"]], best={(1, 1)},
                            text_columns=[0])  # fmt: skip
    assert out.startswith('<div class="scroll"><table>') and out.endswith("</table></div>")
    assert '<td class="text">&lt;x&gt;</td>' in out and '<td class="na">–</td>' in out
    assert '<td class="text"><i>y</i></td>' in out and '<td class="best">2.0</td>' in out


def test_figure_is_shown_at_half_its_pixels_and_links_to_the_file():
    out = report_html.figure(_png(300, 120), 'a "plot"', "what to see", href="p.png", file="p.png")
    assert re.search(r'<a href="p.png" title="full size"><img src="data:image/png;base64,[^"]+" alt="a &quot;plot'
                     r'&quot;" width="150" height="60" data-file="p.png"></a><figcaption>what to see</figcaption>',
                     out)  # fmt: skip
    with pytest.raises(ValueError, match="PNG"):
        report_html.figure(b"GIF89a" + bytes(30), "x", "y")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([84.2, 1.5], 1),
        ([0.6363, 0.12], 3),
        ([150.0, 2.0], 1),
        ([150.0, 300.0], 0),
        ([0.0012, None, float("nan")], 4),
        ([], 0),
    ],
)
def test_column_decimals_give_three_digits_to_the_largest_two_to_the_smallest(values, expected):
    assert report_html.column_decimals(values) == expected


def test_format_fixed():
    assert [report_html.format_fixed(v, 2) for v in (1.0, 2.345, None, float("nan"), "inf")] == [
        "1.00", "2.35", None, "nan", "inf"]  # fmt: skip


def test_best_row_by_direction():
    assert report_html.best_row([3.0, 0.9, 1.5], "min") == 1
    assert report_html.best_row([3.0, 0.9, float("nan")], "max") == 0
    assert report_html.best_row([4.0, 0.3, 2.0], "one") == 2  # |ln 2| < |ln 0.3| < |ln 4|
    assert report_html.best_row([0.5, 2.0], "one") is None  # a tie on the log scale
    assert report_html.best_row([1.0, None], "min") is None  # one finite value: nothing to compare
    with pytest.raises(ValueError, match="direction"):
        report_html.best_row([1.0, 2.0], "lowest")


def test_glossary_lists_the_asked_terms_in_order():
    out = report_html.glossary(["MIR", "GWC"])
    assert out.index("<dt>MIR</dt>") < out.index("<dt>GWC</dt>") and 'id="glossary"' in out
    with pytest.raises(KeyError):
        report_html.glossary(["nope"])


# --- issue 25: a link in a report is an http(s) URL or a relative path, nothing that runs when clicked ---------

REFUSED_LINKS = [
    "javascript:alert(1)",
    "JavaScript:alert(1)",
    "  javascript:alert(1)",
    "java\tscript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "vbscript:msgbox(1)",
    "file:///etc/passwd",
    "//evil.example/x",
    "https:relative-without-host",
]


@pytest.mark.parametrize("href", REFUSED_LINKS)
def test_a_link_with_another_scheme_is_refused(href):
    with pytest.raises(ValueError, match="link .*: (only http\\(s\\) URLs and relative paths|a link must be a string)"):
        report_html.page("T", "sub", [], links={"x": href})
    with pytest.raises(ValueError):
        report_html.figure(_png(4, 4), "a", "b", href=href)


@pytest.mark.parametrize(
    "href", ["https://example.org/run?id=1&x=2", "http://example.org", "../report.html", "report.html#mir", "#top"]
)
def test_http_and_relative_links_are_kept(href):
    assert f'<a href="{html.escape(href)}">x</a>' in report_html.page("T", "sub", [], links={"x": href})
