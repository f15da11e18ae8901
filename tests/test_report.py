"""The report: HTML that parses and embeds every plot, PNGs that decode to real images, a JSON that holds
every number shown, N models overlaid, and the `normalign report` command line."""

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import hf_normalign
from hf_normalign import cli
from hf_normalign.diagnostics import plots
from hf_normalign.diagnostics.degradation import DegradationResult
from hf_normalign.diagnostics.keyspace import KeySpaceResult
from hf_normalign.diagnostics.mir_math import MIRResult
from hf_normalign.diagnostics.profile import ModalityProfile
from hf_normalign.diagnostics.report import METRICS, build_report, format_number
from hf_normalign.testing import tiny_model, tiny_processor

_VOID = {"meta", "img", "br", "hr", "link", "input"}
_RESULT_TYPES = {"profile": ModalityProfile, "mir": MIRResult, "key_space": KeySpaceResult,
                 "degradation": DegradationResult}  # fmt: skip


class _Page(HTMLParser):
    """Collects <img> attributes and table cells, and checks that every non-void tag is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.cells, self.errors = [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in _VOID:
            self.stack.append(tag)
        if tag == "td":
            self._cell = ""

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")
        if tag == "td":
            self.cells.append(self._cell)
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
        assert img["src"].startswith(prefix) and img["alt"]
        assert base64.b64decode(img["src"][len(prefix) :]) == (report.out_dir / img["data-file"]).read_bytes()
    assert 'src="http' not in report.html.read_text() and "<script" not in report.html.read_text()


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
    elif (isinstance(value, (int, float)) and not isinstance(value, bool)) or value in ("nan", "inf", "-inf"):
        out.add(format_number(value))
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
    shown = [c.strip() for c in page.cells if re.fullmatch(r"-?[\d.]+(e[-+]\d+)?|nan|-?inf", c.strip())]
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
    assert len(fig.axes[0].get_lines()) == 2 * len(profiles)  # vision + text per model
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
    assert cli.main(["report", str(tmp_path / "base"), "--out", str(out), "--metrics", "nope", "--no-progress"]) == 2
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


def test_renders_in_headless_chromium(report, tmp_path):
    browser = next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        pytest.skip("no chromium on this machine")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1280,2400", report.html.as_uri()], check=True, timeout=120,
                   capture_output=True)  # fmt: skip
    arr = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"), dtype=np.int16)
    colours = (arr[..., 0].astype(np.int32) << 16) | (arr[..., 1].astype(np.int32) << 8) | arr[..., 2]
    assert len(np.unique(colours)) > 50  # text, tables and plots were drawn
