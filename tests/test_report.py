"""The report: HTML that parses and embeds every plot, PNGs that decode to real images, a JSON that holds
every number shown, N models overlaid, and the `normalign report` command line."""

import base64
import json
import re
import struct
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from browser import assert_readable, require_chromium
from PIL import Image
from plot_pixels import pixels_of, render

import hf_normalign
from hf_normalign import cli
from hf_normalign.diagnostics import plots
from hf_normalign.diagnostics.metrics.degradation import DegradationResult
from hf_normalign.diagnostics.metrics.keyspace import KeySpaceResult
from hf_normalign.diagnostics.metrics.mir import MIRResult
from hf_normalign.diagnostics.metrics.profile import ModalityProfile
from hf_normalign.diagnostics.report import METRICS, build_report
from hf_normalign.diagnostics.report_page import coincidence_note
from hf_normalign.testing import tiny_model, tiny_processor

_VOID = {"meta", "img", "br", "hr", "link", "input"}
_RESULT_TYPES = {"profile": ModalityProfile, "mir": MIRResult, "key_space": KeySpaceResult,
                 "degradation": DegradationResult}  # fmt: skip


class _Page(HTMLParser):
    """Collects <img> attributes and table cells, and checks that every non-void tag is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.cells, self.errors, self.rows, self.metas = [], [], [], [], [], []
        self._cell, self._href, self._class = None, None, ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append({**attrs, "link": self._href, "in_figure": "figure" in self.stack})
        elif tag == "meta":
            self.metas.append(attrs)
        elif tag not in _VOID:
            self.stack.append(tag)
        if tag == "a":
            self._href = attrs.get("href")
        if tag == "tr":
            self.rows.append([])
        if tag == "td":
            self._cell, self._class = "", attrs.get("class") or ""

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")
        if tag == "a":
            self._href = None
        if tag == "td":
            self.cells.append(self._cell)
            self.rows[-1].append((self._cell, self._class))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    processor = tiny_processor("llava")
    models = {
        "base": (tiny_model("llava"), processor),
        "aligned": (hf_normalign.patch(tiny_model("llava"), methods=["projector_norm"]), processor),
        "seed 1": (tiny_model("llava", seed=1), processor),
    }
    out = tmp_path_factory.mktemp("report")
    return build_report(models, out, num_samples=6, degradation_samples=12, max_key_samples=200, progress=False)


def test_files_written(report):
    names = {p.name for p in report.out_dir.iterdir()}
    expected = {"report.html", "report.json", *(f"{s}.png" for s in
                ("norms", "update_rate", "mir", "key_gap", "key_scatter", "degradation"))}  # fmt: skip
    assert names == expected
    assert set(report.results["aligned"]) == set(METRICS)


def test_html_parses_and_embeds_every_plot(report):
    page = _Page()
    page.feed(report.html.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors and not page.stack
    pngs = sorted(p.name for p in report.out_dir.glob("*.png"))
    assert sorted(img["data-file"] for img in page.images) == pngs
    for img in page.images:  # self-contained: the embedded bytes are the PNG file
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix) and len(img["alt"]) > 30  # alt: the caption, not a file stem
        data = base64.b64decode(img["src"][len(prefix) :])
        assert data == (report.out_dir / img["data-file"]).read_bytes()
        width, height = struct.unpack(">II", data[16:24])  # PNG header: drawn at 2x, shown at half size
        assert (int(img["width"]), int(img["height"])) == (width // 2, height // 2)
        assert img["link"] == img["data-file"] and img["in_figure"]  # links to the full-size file
    assert 'src="http' not in report.html.read_text() and "<script" not in report.html.read_text()
    assert {"name": "viewport", "content": "width=device-width, initial-scale=1"} in page.metas


def test_every_png_decodes_to_a_non_blank_image(report):
    for path in report.out_dir.glob("*.png"):
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.int16)
        assert arr.shape[0] > 200 and arr.shape[1] > 300
        ink = (np.abs(arr - arr[0, 0]).sum(axis=2) > 30).mean()  # pixels unlike the background
        assert 0.01 < ink < 0.9, path.name
        colours = (arr[..., 0].astype(np.int32) << 16) | (arr[..., 1].astype(np.int32) << 8) | arr[..., 2]
        assert len(np.unique(colours)) > 20, path.name  # drawn in several colours


def _json_numbers(value, out):
    if isinstance(value, dict):
        for v in value.values():
            _json_numbers(v, out)
    elif isinstance(value, list):
        for v in value:
            _json_numbers(v, out)
    elif (isinstance(value, int) and not isinstance(value, bool)) or value in ("nan", "inf", "-inf"):
        out.add(str(value))
    elif isinstance(value, float):
        out.update(f"{value:.{d}f}" for d in range(7))
    return out


def test_json_is_strict_and_carries_every_number_shown(report):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    data = json.loads(report.json.read_text(encoding="utf-8"), parse_constant=no_constants)
    assert list(data["models"]) == ["base", "aligned", "seed 1"]
    assert data["plots"] == {stem: path.name for stem, path in report.plots.items()}
    numbers = _json_numbers(data, set())
    page = _Page()
    page.feed(report.html.read_text(encoding="utf-8"))
    shown = [c.strip() for c in page.cells if re.fullmatch(r"-?[\d.]+|nan|-?inf", c.strip())]
    assert len(shown) > 100
    missing = sorted(set(shown) - numbers)
    assert not missing, f"shown in the HTML but not in report.json: {missing[:10]}"
    for name, entry in data["models"].items():
        assert entry["summary"]["mir"] == report.results[name]["mir"].mir
        for metric, cls in _RESULT_TYPES.items():  # the JSON holds the full results, restorable
            restored = cls.from_dict(entry[metric])
            assert restored.layers == report.results[name][metric].layers


def test_models_are_overlaid_and_the_aligned_model_closes_the_norm_gap(report):
    profiles = {name: res["profile"] for name, res in report.results.items()}
    fig = plots.plot_norms(profiles)
    data_lines = [line for line in fig.axes[0].get_lines() if line.get_marker() not in (None, "None", "")]
    assert len(data_lines) == 2 * len(profiles)  # vision + text per model (the band edges have no markers)
    assert len(fig.axes[0].get_legend().get_texts()) == len(profiles) + 2
    base, aligned = report.summary["base"], report.summary["aligned"]
    assert abs(np.log(aligned["norm_ratio_input"])) < abs(np.log(base["norm_ratio_input"]))


def test_cli_report_with_compare(tmp_path, capsys):
    processor = tiny_processor("llava")
    tiny_model("llava").save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    hf_normalign.patch(tiny_model("llava"), methods=["projector_norm"]).save_pretrained(tmp_path / "aligned")
    processor.save_pretrained(tmp_path / "aligned")
    out = tmp_path / "out"
    argv = ["report", str(tmp_path / "base"), "--compare", str(tmp_path / "aligned"), "--out", str(out),
            "--metrics", "profile,key_space", "--num-samples", "3", "--max-key-samples", "100", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    data = json.loads((out / "report.json").read_text())
    assert list(data["models"]) == ["base", "aligned"]
    assert set(data["plots"]) == {"norms", "update_rate", "key_gap", "key_scatter"}
    ratios = [data["models"][n]["summary"]["norm_ratio_input"] for n in ("base", "aligned")]
    assert ratios[0] != pytest.approx(ratios[1])  # the aligned checkpoint loaded patched
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # a usage error, found by the parser before any model loads
        cli.main(["report", str(tmp_path / "base"), "--out", str(out), "--metrics", "nope", "--no-progress"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", "--help"])
    assert exit_info.value.code == 0


def test_errors(tmp_path):
    pair = (tiny_model("llava"), tiny_processor("llava"))
    with pytest.raises(ValueError, match="at least one model"):
        build_report({}, tmp_path)
    with pytest.raises(ValueError, match="unknown metrics"):
        build_report({"m": pair}, tmp_path, metrics=["profile", "fid"])
    with pytest.raises(TypeError, match="tuple"):
        build_report({"m": pair[0]}, tmp_path)


def _decimals(cell):
    return len(cell.split(".")[1]) if "." in cell else 0


def test_summary_has_fixed_decimals_per_row_and_marks_the_best(report):
    page = _Page()
    page.feed(report.html.read_text(encoding="utf-8"))
    names = list(report.summary)
    rows = {r[0][0]: r[1:] for r in page.rows if r and r[0][0].startswith(("MIR", "norm ratio vision/text, LLM"))}
    mir_row = rows["MIR (lower = better integrated)"]
    assert len({_decimals(c) for c, _ in mir_row}) == 1  # one number of decimals across the models
    best_mir = min(names, key=lambda n: report.summary[n]["mir"])
    assert [n for n, (_, cls) in zip(names, mir_row, strict=True) if "best" in cls] == [best_mir]
    ratio_row = rows["norm ratio vision/text, LLM input"]  # best = closest to 1, on a log scale
    closest = min(names, key=lambda n: abs(np.log(report.summary[n]["norm_ratio_input"])))
    assert [n for n, (_, cls) in zip(names, ratio_row, strict=True) if "best" in cls] == [closest]


def test_glossary_and_captions_explain_the_names(report):
    text = report.html.read_text(encoding="utf-8")
    glossary = text[text.index('<section id="glossary">') :]
    for term in ("FID", "MIR", "layer numbering", "final norm", "MMD²", "JSD", "units"):
        assert f"<dt>{term}</dt>" in glossary, term
    assert text.count("<figcaption>") == len(report.plots)
    assert 'href="../report.html"' not in text  # links only when asked for


def test_every_model_stays_visible_where_curves_coincide():
    """Three identical profiles and one apart: every model's colour is drawn inside the axes (not only in the
    legend), every legend entry is drawn, and the caption names the three that coincide."""
    from hf_normalign.diagnostics.metrics.profile import profile_from_features

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(30, 8, generator=g) * (1 + k) for k in range(3)]
    text = [torch.randn(20, 8, generator=g) for _ in range(3)]
    same = profile_from_features(feats, text)
    apart = profile_from_features([f * 3 for f in feats], text)
    profiles = {"baseline": same, "moca": same, "pre": same, "aligned": apart}
    styles = plots.variant_styles(list(profiles))
    for fig in (plots.plot_norms(profiles), plots.plot_update_rate(profiles)):
        image = render(fig)
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is None:
                continue
            labels = [t.get_text() for t in legend.get_texts()]
            assert labels[: len(profiles)] == list(profiles)
            for name, style in styles.items():
                assert pixels_of(image, ax, style["color"]) > 50, (name, ax.get_title())
                assert pixels_of(image, legend, style["color"]) > 5, (name, "legend")
        plots.pyplot().close(fig)
    note = coincidence_note({n: p.to_dict() for n, p in profiles.items()}, ("vision_norm_mean", "norm_ratio"))
    assert note.startswith("baseline, moca and pre coincide")


def test_coinciding_is_relative_to_the_span():
    # span 10: 1% = 0.1. a/b differ by 0.05 (coincide), c by 0.5 from a (apart); d has another length.
    series = {"a": [0.0, 10.0], "b": [0.05, 10.0], "c": [0.5, 10.0], "d": [0.0]}
    assert plots.coinciding(series) == [["a", "b"]]
    assert plots.coinciding({"a": [1.0, float("nan")], "b": [1.0, float("nan")]}) == [["a", "b"]]
    assert plots.coinciding({"a": [1.0, 2.0], "b": [1.0, float("inf")]}) == []
    results = {"a": {"mmd2": [0.0, 1.0], "jsd": [0.0, 1.0]}, "b": {"mmd2": [0.0, 1.0], "jsd": [0.5, 1.0]}}
    assert coincidence_note(results, ("mmd2",)).startswith("a and b coincide")
    assert coincidence_note(results, ("mmd2", "jsd")) == ""  # they must coincide in every curve


def test_renders_in_headless_chromium(report, tmp_path):
    browser = require_chromium()
    assert_readable(browser, report.html, tmp_path)


def test_vision_path_norms_and_gain_in_html_and_json(report):
    page = _Page()
    page.feed(report.html.read_text(encoding="utf-8"))
    rows = {r[0][0]: [c for c, _ in r[1:]] for r in page.rows if r}
    names = list(report.summary)
    data = json.loads(report.json.read_text(encoding="utf-8"))
    for stage, label in (("vision_encoder_output", "vision-encoder output (projector input), mean norm"),
                         ("projector_output", "projector output, before its LayerNorm, mean norm"),
                         ("llm_input_vision", "vision tokens at the LLM input, mean norm"),
                         ("text_embedding", "text-passage embeddings, mean norm")):  # fmt: skip
        means = [report.results[n]["profile"].vision_path_norms[stage]["mean"] for n in names]
        assert [float(c) for c in rows[label]] == pytest.approx(means, rel=5e-3, abs=1e-3), stage
        assert [data["models"][n]["profile"]["vision_path_norms"][stage]["mean"] for n in names] == means
    gain = report.results["aligned"]["profile"].projector_gain
    assert gain["mean_abs_to_init"] == pytest.approx(1.0, abs=1e-6)  # untrained: the gain is at its init
    assert rows["gain mean |g|"] == ["–", f"{gain['mean_abs']:.4f}", "–"]
    assert data["models"]["aligned"]["summary"]["gain_mean_abs"] == gain["mean_abs"]
    assert data["models"]["base"]["summary"]["gain_mean_abs"] is None
    glossary = report.html.read_text(encoding="utf-8").split('<section id="glossary">')[1]
    assert "<dt>vision path norms</dt>" in glossary and "<dt>LayerNorm gain</dt>" in glossary
    assert "<dt>t-SNE</dt>" not in glossary  # no t-SNE map in this report


def test_key_tsne_map_in_report(tmp_path):
    pytest.importorskip("sklearn")
    pair = (tiny_model("llava"), tiny_processor("llava"))
    rep = build_report({"m": pair}, tmp_path, metrics=["key_space"], num_samples=3, max_key_samples=60,
                       key_tsne=True, progress=False)  # fmt: skip
    assert set(rep.plots) == {"key_gap", "key_scatter", "key_tsne"}
    data = json.loads(rep.json.read_text(encoding="utf-8"))
    scatter = data["models"]["m"]["key_space"]["scatter"]
    assert scatter == rep.results["m"]["key_space"].scatter and all("tsne" in s for s in scatter.values())
    text = rep.html.read_text(encoding="utf-8")
    assert 'data-file="key_tsne.png"' in text and "<dt>t-SNE</dt>" in text


def test_a_javascript_link_is_refused_before_any_work(tmp_path):
    """Issue 25: a caller's ``links=`` href is checked first: nothing is measured or written."""
    pair = (tiny_model("llava"), tiny_processor("llava"))
    with pytest.raises(ValueError, match="link 'javascript:alert\\(1\\)': only http\\(s\\) URLs and relative paths"):
        build_report({"m": pair}, tmp_path / "out", links={"run": "javascript:alert(1)"}, progress=False)
    assert not (tmp_path / "out").exists()
