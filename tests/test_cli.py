"""Issue 12: the `normalign` command line. A user's mistake ends in one stderr line naming problem and fix, with
exit status 2 (usage, found before any work) or 1 (failure while working); --debug shows the traceback; help
imports nothing heavy and prints no third-party warning."""

import os
import subprocess
import sys

import pytest

from hf_normalign import cli
from hf_normalign.testing import tiny_model

HEAVY = ("torch", "transformers", "bitsandbytes", "numpy", "huggingface_hub")


@pytest.mark.parametrize("argv", [["--help"], *([name, "--help"] for name in cli.COMMANDS)], ids=" ".join)
def test_help_imports_nothing_heavy_and_warns_nothing(argv):
    code = (
        "import sys\nfrom hf_normalign import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.stderr == ""
    assert done.stdout.strip().endswith("HEAVY []")
    assert "usage: normalign" in done.stdout


def test_mirrored_choices_match_the_library():
    from hf_normalign.diagnostics import report
    from hf_normalign.diagnostics.maths import frechet
    from hf_normalign.diagnostics.maths import mir as mir_math
    from hf_normalign.diagnostics.metrics import mir
    from hf_normalign.diagnostics.probes import encoding as capture

    assert cli.OUTLIER_MODES == mir_math.OUTLIER_MODES and cli.OUTLIER_STATS == mir_math.OUTLIER_STATS
    assert cli.TEXT_TOKENS == capture.TEXT_TOKENS and cli.MIR_PRESETS == mir.PRESETS
    assert cli.SQRT_METHODS == frechet.SQRT_METHODS
    assert cli.REPORT_METRICS == report.METRICS


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "model"
    tiny_model("llava").save_pretrained(path)
    return path


def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


USAGE_ERRORS = {
    "num-samples 0": (["mir", "{base}", "--num-samples", "0"], "--num-samples: expected a positive integer, got '0'"),
    "dtype float17": (["mir", "{base}", "--dtype", "float17"], "invalid choice: 'float17'"),
    "json in a missing folder": (["mir", "{base}", "--json", "{tmp}/missing/x.json"], "does not exist: create it"),
    "layers": (["mir", "{base}", "--layers", "a-b"], "bad layer list"),
    "patch dtype": (["patch", "{base}", "--methods", "moca", "--out", "{tmp}/o", "--dtype", "float17"], "float17"),
    "patch no methods": (["patch", "{base}", "--out", "{tmp}/o"], "--methods --config is required"),
    "patch unknown method": (["patch", "{base}", "--methods", "mocha", "--out", "{tmp}/o"], "Unknown method"),
    "patch empty methods": (["patch", "{base}", "--methods", ",", "--out", "{tmp}/o"], "method list is empty"),
    "patch config missing": (["patch", "{base}", "--config", "{tmp}/none.json", "--out", "{tmp}/o"], "cannot read"),
    "patch config not UTF-8": (["patch", "{base}", "--config", "{tmp}/latin1.json", "--out", "{tmp}/o"], "UTF-8"),
    "patch config bad value": (["patch", "{base}", "--config", "{tmp}/gwc.json", "--out", "{tmp}/o"], "gwc must be"),
    "patch out is a file": (["patch", "{base}", "--methods", "moca", "--out", "{tmp}/file"], "is not a folder"),
    "push wrong path": (["push", "{tmp}/missing", "me/x"], "is not an existing directory"),
    "push non-aligned dir": (["push", "{base}", "me/x"], "holds no normalign_config.json"),
    "report out is a file": (["report", "{base}", "--out", "{tmp}/file"], "is not a folder"),
    "demo steps 0": (["demo", "--steps", "0"], "expected a positive integer"),
    "unknown command": (["nope"], "invalid choice: 'nope'"),
}


@pytest.mark.parametrize("case", USAGE_ERRORS, ids=list(USAGE_ERRORS))
def test_usage_errors_are_one_line_with_status_2(case, base, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "latin1.json").write_bytes('{"moca": {"layers": [0]}, "é": 1}'.encode("latin-1"))
    (tmp_path / "gwc.json").write_text('{"projector_norm": {"gwc": "no"}}')
    argv, phrase = USAGE_ERRORS[case]
    err = usage_error([a.format(base=base, tmp=tmp_path) for a in argv], capsys)
    assert phrase in err, err
    assert not (tmp_path / "o").exists()


RUNTIME_ERRORS = {
    "mir on a missing model": (["mir", "{tmp}/no-model", "--device", "cpu"], "no-model"),
    "patch a non-model folder": (["patch", "{tmp}", "--methods", "moca", "--out", "{tmp}/o"], "config.json"),
}


@pytest.mark.parametrize("case", RUNTIME_ERRORS, ids=list(RUNTIME_ERRORS))
def test_runtime_errors_are_one_line_with_status_1(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv, phrase = RUNTIME_ERRORS[case]
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"normalign {argv[0]}: error: ") and phrase in err, err
    assert "--debug" in err and "Traceback" not in err
    with pytest.raises((OSError, ValueError)):  # --debug: the exception itself, for the traceback
        cli.main(["--debug", *argv])


def test_push_without_network_is_one_line_with_status_1(tmp_path):
    from hf_normalign import patch

    patch(tiny_model("llava"), methods="moca").save_pretrained(tmp_path / "aligned")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x", "HF_HUB_ETAG_TIMEOUT": "1"}
    command = [sys.executable, "-m", "hf_normalign", "push", str(tmp_path / "aligned"), "me/x"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("normalign push")]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_missing_optional_package_names_the_extra():
    assert cli._one_line(ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")) == (
        "the optional package 'matplotlib' is not installed: pip install 'hf-normalign[plots]'"
    )
