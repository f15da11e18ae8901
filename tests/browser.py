"""Headless Chromium for the report tests: open a page at a given width and measure what a reader sees.

A copy of the page gets a small script that, once the page has loaded, writes its measurements into the
DOM; ``chromium --dump-dom`` prints the DOM, and the measurements are read back from it. No DevTools
protocol, no extra Python package.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

_MEASURE = """<script>
window.addEventListener("load", () => {
  let minFont = Infinity, minFontText = "";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode, el = node.parentElement;
    if (!node.textContent.trim() || el.closest("script,style")) continue;
    const size = parseFloat(getComputedStyle(el).fontSize);
    if (size < minFont) { minFont = size; minFontText = node.textContent.trim().slice(0, 60); }
  }
  const out = {
    innerWidth: window.innerWidth,
    scrollWidth: document.documentElement.scrollWidth,
    minFont, minFontText,
    images: [...document.images].map(i => ({naturalWidth: i.naturalWidth, width: i.getBoundingClientRect().width,
                                           alt: i.alt.slice(0, 40)})),
  };
  const pre = parent.document.createElement("pre");
  pre.id = "normalign-measure";
  pre.textContent = JSON.stringify(out);
  parent.document.body.appendChild(pre);
});
</script>"""
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=20000"]


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome binary on PATH, or None."""
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _framed(page: Path, width: int, height: int, script: str, workdir: Path) -> Path:
    """A page holding ``page`` (plus ``script``) in a ``width`` x ``height`` px iframe: headless windows are
    at least 500 px wide, an iframe can be a phone's 390. srcdoc keeps the frame same-origin, so its
    script can write into the outer page."""
    inner = page.read_text(encoding="utf-8").replace("</body>", script + "</body>")
    outer = workdir / f"framed-{width}.html"
    outer.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><style>body{margin:0}iframe{border:0;display:block}'
        f'</style></head><body><iframe width="{width}" height="{height}" srcdoc="{html.escape(inner)}"></iframe>'
        "</body></html>",
        encoding="utf-8",
    )
    return outer


def measure(browser: str, page: Path, width: int, workdir: Path) -> dict[str, Any]:
    """Load ``page`` ``width`` CSS px wide; returns innerWidth, scrollWidth, the smallest computed
    font size of any text (with that text) and every image's naturalWidth and shown width."""
    framed = _framed(page, width, 1000, _MEASURE, workdir)
    dom = subprocess.run(
        [browser, *_FLAGS, f"--window-size={max(width, 500)},1000", "--dump-dom", framed.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout
    found = re.search(r'<pre id="normalign-measure">(.*?)</pre>', dom, re.S)
    if found is None:
        raise AssertionError(f"the page's measurements are missing from Chromium's DOM dump ({len(dom)} chars)")
    return json.loads(html.unescape(found.group(1)))


def screenshot(browser: str, page: Path, width: int, height: int, out: Path) -> None:
    """A PNG of the top ``width`` x ``height`` px of ``page`` (256 colours: small enough for docs/).

    ``python -c "import sys; sys.path.insert(0, 'tests'); from browser import *; from pathlib import Path;
    screenshot(find_chromium(), Path('normalign-demo/report.html'), 390, 1500, Path('docs/img/demo-report-390.png'))"``
    """
    import tempfile

    from PIL import Image

    out = out.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        framed = _framed(page, width, height, "", Path(tmp))
        subprocess.run(
            [browser, *_FLAGS, f"--window-size={max(width, 500)},{height}", f"--screenshot={out}", framed.as_uri()],
            capture_output=True,
            timeout=180,
            check=True,
        )
    with Image.open(out) as shot:
        cropped = shot.convert("RGB").crop((0, 0, width, height)).quantize(256)
    cropped.save(out, optimize=True)


def assert_readable(browser: str, page: Path, workdir: Path, widths: tuple[int, ...] = (390, 1400)) -> None:
    """At each width: no horizontal page scroll, every image loaded, no text below 11 px."""
    for width in widths:
        m = measure(browser, page, width, workdir)
        assert m["innerWidth"] == width, m["innerWidth"]
        assert m["scrollWidth"] <= m["innerWidth"], f"{page.name} at {width} px scrolls sideways: {m['scrollWidth']}"
        assert m["images"], f"{page.name}: no images"
        broken = [i["alt"] for i in m["images"] if i["naturalWidth"] <= 0]
        assert not broken, f"{page.name} at {width} px: images not loaded: {broken}"
        assert all(0 < i["width"] <= width for i in m["images"]), m["images"]
        assert m["minFont"] >= 11, f"{page.name} at {width} px: {m['minFont']} px text: {m['minFontText']!r}"


def require_chromium() -> str:
    """The Chromium binary, or skip the test with the reason shown in pytest's warnings summary (which a
    plain ``pytest -q`` prints, unlike skip reasons)."""
    import warnings

    import pytest

    browser = find_chromium()
    if browser is None:
        reason = "no chromium on PATH (apt-get install chromium): the report rendering check was skipped"
        warnings.warn(reason, stacklevel=2)
        pytest.skip(reason)
    return browser
