"""Issue 12: the `normalign` command line. A user's mistake ends in one stderr line naming problem and fix, with
exit status 2 (usage, found before any work) or 1 (failure while working); --debug shows the traceback; help
imports nothing heavy and prints no third-party warning."""

import importlib.util
import json
import os
import re
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
    "num-samples 0": (["mir", "{base}", "--num-samples", "0"], "--num-samples: expected an integer of at least 2"),
    "num-samples 1": (["mir", "{base}", "--num-samples", "1"], "--num-samples: expected an integer of at least 2"),
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
    "mir on a Hub id, offline": (["mir", "me/no-model", "--device", "cpu"], "couldn't connect"),
    "report on a Hub id, offline": (
        ["report", "me/no-model", "--out", "{tmp}/o", "--device", "cpu"],
        "couldn't connect",
    ),
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


# --- issues 21, 22, 25: errors that tell the truth, one exit-code rule, nothing on stdout but results ----------


def _fake_command(monkeypatch, run: str) -> None:
    """Make `normalign demo` import ``run`` ("module:function"), through the real import machinery."""
    monkeypatch.setitem(cli.COMMANDS, "demo", cli.Command("x", "x", lambda p: None, run))


MISSING_MODULES = {
    # the module the command imports, the modules made absent (None in sys.modules), the message
    "hf-normalign itself": (
        "hf_normalign.commands.demo:run",
        ["hf_normalign.commands.demo"],
        "hf-normalign is installed incompletely: module 'hf_normalign.commands.demo' missing; reinstall: "
        "pip install --force-reinstall hf-normalign",
    ),
    "an optional extra": (
        "matplotlib.pyplot:figure",
        ["matplotlib", "matplotlib.pyplot"],
        "the optional package 'matplotlib' is not installed: pip install 'hf-normalign[plots]'",
    ),
    "an extra whose module is named otherwise": (
        "sklearn.manifold:TSNE",
        ["sklearn", "sklearn.manifold"],
        "the optional package 'sklearn' is not installed: pip install 'hf-normalign[tsne]'",
    ),
    "the smallest extra of several": (
        "peft:get_peft_model",
        ["peft"],
        "the optional package 'peft' is not installed: pip install 'hf-normalign[peft]'",
    ),
    "a required dependency": ("yaml:safe_load", ["yaml"], "hf-normalign's dependency 'yaml' is not installed"),
    "a part of an installed package": (
        "yaml.no_such_part:run",
        [],
        "module 'yaml.no_such_part' is missing from the installed package 'yaml' (an incomplete install or an "
        "unsupported version): reinstall it: pip install --force-reinstall pyyaml",
    ),
    "a module nobody lists": ("no_such_module_xyz:run", [], "the module 'no_such_module_xyz' is not installed"),
}


@pytest.mark.parametrize("case", MISSING_MODULES, ids=list(MISSING_MODULES))
def test_a_missing_module_is_named_with_the_right_fix(case, monkeypatch, capsys):
    run, absent, message = MISSING_MODULES[case]
    _fake_command(monkeypatch, run)
    for name in absent:
        monkeypatch.setitem(sys.modules, name, None)  # what an uninstalled module looks like to `import`
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert ("pip install '" in err) == ("optional package" in message)  # "pip install X" only for an absent extra


def test_broken_install_is_not_reported_as_a_missing_optional_package(tmp_path):
    """Issue 21's wheel: hf_normalign.diagnostics.probes missing; `normalign demo --quick` blamed 'hf_normalign'
    as an optional package to pip install."""
    code = (
        "import sys\nsys.modules['hf_normalign.diagnostics.probes'] = None\nfrom hf_normalign import cli\n"
        f"sys.exit(cli.main(['demo', '--quick', '--out', {str(tmp_path / 'demo')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    last = done.stderr.splitlines()[-1]
    assert last.startswith(
        "normalign demo: error: hf-normalign is installed incompletely: module 'hf_normalign.diagnostics.probes"
    ) and last.endswith("missing; reinstall: pip install --force-reinstall hf-normalign (--debug shows the traceback)")
    assert "optional package" not in done.stderr


EARLY_USAGE_ERRORS = {
    "mir: a mistyped local path": (["mir", "{tmp}/modle"], "the local path {tmp}/modle does not exist"),
    "mir: a mistyped relative path": (["mir", "./modle"], "the local path ./modle does not exist"),
    "mir: a mistyped home path": (["mir", "~/no/such/modle"], "the local path ~/no/such/modle does not exist"),
    "mir: a file for a model": (["mir", "{tmp}/file"], "is a file: give the model folder"),
    "patch: a mistyped local path": (
        ["patch", "{tmp}/modle", "--methods", "moca", "--out", "{tmp}/o"],
        "the local path {tmp}/modle does not exist",
    ),
    "report: a mistyped local path": (["report", "./modle", "--out", "{tmp}/o"], "the local path ./modle"),
    "report: a mistyped --compare": (
        ["report", "{base}", "--compare", "{tmp}/modle", "--out", "{tmp}/o"],
        "argument --compare: the local path {tmp}/modle does not exist",
    ),
    "serve: a mistyped local path": (["serve", "--dry-run", "{tmp}/modle"], "the local path {tmp}/modle"),
    "push: not a repo id": (["push", "{aligned}", "me/x/y"], "'me/x/y' is not a Hub repo id"),
    "mir: log base 0": (["mir", "{base}", "--log-base", "0"], "--log-base: expected a positive number other than 1"),
    "mir: log base 1": (["mir", "{base}", "--log-base", "1"], "--log-base: expected a positive number other than 1"),
    "mir: log base nan": (["mir", "{base}", "--log-base", "nan"], "other than 1, got 'nan'"),
    "mir: images without texts": (["mir", "{base}", "--images", "{tmp}"], "--images and --texts go together"),
    "mir: texts without images": (["mir", "{base}", "--texts", "{tmp}/file"], "--images and --texts go together"),
    "report: images without texts": (
        ["report", "{base}", "--images", "{tmp}", "--out", "{tmp}/o"],
        "--images and --texts go together",
    ),
    "report: unknown metric": (["report", "{base}", "--metrics", "mir,nope", "--out", "{tmp}/o"], "['nope']"),
}


def test_usage_errors_exit_2_before_anything_is_imported(base, tmp_path):
    """Every subcommand, the same rule: a usage error is one stderr line, status 2, found before torch (or a model)
    is loaded. One subprocess runs every case and reports status, stderr and whether torch was imported."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "aligned").mkdir()
    (tmp_path / "aligned" / "normalign_config.json").write_text("{}")
    cases = {
        case: [a.format(base=base, tmp=tmp_path, aligned=tmp_path / "aligned") for a in argv]
        for case, (argv, _) in EARLY_USAGE_ERRORS.items()
    }
    code = (
        "import contextlib, io, json, sys\nfrom hf_normalign import cli\nout = {}\n"
        "for case, argv in json.loads(sys.argv[1]).items():\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n            status = cli.main(argv)\n"
        "        except SystemExit as exit_:\n            status = exit_.code\n"
        "    out[case] = [status, err.getvalue(), 'torch' in sys.modules]\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for case, (status, err, torch_imported) in json.loads(done.stdout).items():
        phrase = EARLY_USAGE_ERRORS[case][1].format(tmp=tmp_path)
        assert status == 2 and err.count("\n") == 1 and phrase in err, (case, status, err)
        assert err.startswith(f"normalign {cases[case][0]}: error: ") and not torch_imported, (case, err)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def base_with_processor(tmp_path_factory):
    from hf_normalign.testing import tiny_processor

    path = tmp_path_factory.mktemp("base_with_processor") / "model"
    tiny_model("llava").save_pretrained(path)
    tiny_processor("llava").save_pretrained(path)
    return path


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hf_normalign", *argv], capture_output=True, text=True, timeout=300, env=env
    )


def test_patch_prints_only_its_result_on_stdout(base_with_processor, tmp_path):
    """transformers' save_pretrained -> accelerate's unwrap_model imports deepspeed (when installed), whose logger
    prints "[WARNING] ... Setting accelerator to CPU" to stdout: while a command runs, stdout is stderr."""
    done = _run_cli("patch", str(base_with_processor), "--methods", "moca", "--out", str(tmp_path / "aligned"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"Saved aligned checkpoint (moca) to {tmp_path / 'aligned'}\n"
    if importlib.util.find_spec("deepspeed") is not None:
        assert "Setting accelerator to CPU" in done.stderr  # the noise is still shown, on stderr


def test_a_python_warning_is_one_clean_line_on_stderr(base_with_processor, tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 40, 200)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "texts.txt").write_text("a red square on the grass\na blue sky over the sea\n")
    done = _run_cli("mir", str(base_with_processor), "--images", str(tmp_path / "images"), "--texts",
                    str(tmp_path / "texts.txt"), "--num-samples", "2", "--device", "cpu", "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "normalign mir: warning: 3 images but 2 texts: pairing the first 2\n" in done.stderr
    assert "UserWarning" not in done.stderr and ".py:" not in done.stderr, done.stderr
    assert "MIR = " in done.stdout and "warning" not in done.stdout


@pytest.mark.parametrize("stage", [1, 2])
def test_recipe_help_imports_no_torch(stage):
    code = (
        f"import sys\nfrom hf_normalign.recipes import stage{stage}\ntry:\n    stage{stage}.main(['--help'])\n"
        f"except SystemExit:\n    pass\nprint('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr == ""
    assert done.stdout.strip().endswith("HEAVY []"), done.stdout[-500:]
    assert f"hf_normalign.recipes.stage{stage}" in done.stdout and "--qlora" in done.stdout
    assert "--learning_rate" in done.stdout and "--help-training lists them all" in done.stdout


@pytest.mark.parametrize(
    ("argv", "phrase"), [(["--model", "nope"], "unknown family 'nope'"), (["--num-samples", "0"], "positive")]
)
def test_make_tiny_data_refuses_bad_options_before_writing(argv, phrase, tmp_path, capsys):
    from hf_normalign.recipes import make_tiny_data

    with pytest.raises(SystemExit) as exit_:
        make_tiny_data.main([str(tmp_path / "tiny"), *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and phrase in err and "Traceback" not in err
    assert not (tmp_path / "tiny").exists()


def test_recipe_help_training_lists_what_help_leaves_to_it(capsys):
    """--help lists every recipe option the full parser has; --help-training adds exactly TrainingArguments'."""
    import dataclasses

    from transformers import TrainingArguments

    from hf_normalign.recipes import stage2

    def options(argv):
        try:
            assert stage2.main(argv) == 0  # the light help returns
        except SystemExit as exit_:  # the full one is argparse's
            assert exit_.code == 0
        return set(re.findall(r"(?m)^\s+(--[\w-]+)", capsys.readouterr().out))

    light, full = options(["--help"]), options(["--help-training"])
    training = {f"--{f.name}" for f in dataclasses.fields(TrainingArguments) if f.init}
    assert light - {"--config", "--push-to-hub"} <= full
    assert {o.replace("--no_", "--", 1) for o in full - light} <= training | light  # with HfArgumentParser's --no_X
    assert {"--learning_rate", "--per_device_train_batch_size"} <= full - light
