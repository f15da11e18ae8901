"""Issue 21: the package as a user gets it from an index, not as the editable install of the tests.

The wheel and the sdist are built offline from the files a fresh clone has (what git lists), each is installed
into a fresh venv that sees this interpreter's dependencies but not the source tree, and there: every module of
the installed package imports, the installed files are the repo's byte for byte (nothing left out, nothing else
installed), the console scripts and entry points load, and `normalign --help`, `normalign mir` on a tiny saved
model and `normalign demo --quick` run. Built once per session. Wall time on the 2-core dev VM shared with other
jobs (load about 5): 110-170 s for everything but the demos (builds, installs, two import walks), plus 200-250 s
for the quick demo (run on the wheel only: the sdist installs the same files byte for byte).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("hf_normalign", "normalign_vllm")
# Optional dependencies a module may import at load time: where one is not installed, that module's import test
# is skipped by name with this reason. Anything else that fails to import fails.
OPTIONAL = {
    "vllm": "the [vllm] extra (vLLM serving)",
    "deepspeed": "the [deepspeed] extra (ZeRO-3)",
    "lmms_eval": "the [eval] extra (lmms-eval)",
}
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

# Run in the fresh venv: import every module found by walking the installed packages (not the repo's tree).
WALK = r"""
import importlib, importlib.util, json, pkgutil, sys, traceback

optional, found = set(sys.argv[1].split(",")), {}

def record(name):
    try:
        importlib.import_module(name)
        found[name] = ["ok", ""]
    except ModuleNotFoundError as err:
        top = (err.name or "").split(".")[0]
        absent = top in optional and importlib.util.find_spec(top) is None
        found[name] = ["absent:" + top if absent else "error", traceback.format_exc()]
    except Exception:
        found[name] = ["error", traceback.format_exc()]

for package in ("hf_normalign", "normalign_vllm"):
    record(package)
    path = getattr(sys.modules.get(package), "__path__", [])
    for info in pkgutil.walk_packages(path, package + ".", onerror=record):
        if not info.name.endswith(".__main__"):  # it runs the CLI: `python -m hf_normalign --help` tests it
            record(info.name)
files = {name: getattr(sys.modules.get(name), "__file__", None) for name in ("hf_normalign", "normalign_vllm")}
print(json.dumps({"modules": found, "files": files}))
"""

ENTRY_POINTS = r"""
import json
from importlib import metadata
dist = metadata.distribution("hf-normalign")
for point in dist.entry_points:
    point.load()
points = sorted([point.group, point.name, point.value] for point in dist.entry_points)
print(json.dumps({"site": str(dist.locate_file("")), "points": points}))
"""


def _source_files() -> list[str]:
    """The files a fresh clone has (tracked ones, and new ones git would add), relative to the repo."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the files to build from are the ones git lists")
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(command, cwd=REPO, capture_output=True, check=True).stdout.decode()
    return sorted(path for path in listed.split("\0") if path and (REPO / path).is_file())


def _package_files() -> list[str]:
    return [path for path in _source_files() if path.split("/")[0] in PACKAGES]


def _module_name(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _repo_modules() -> list[str]:
    """Module names of the repo's package sources (the installed walk must find exactly these)."""
    if not (REPO / ".git").exists():
        return []  # the fixtures skip the module with the reason
    return sorted(_module_name(p) for p in _package_files() if p.endswith(".py") and not p.endswith("/__main__.py"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(command: list, *, cwd: Path, timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def _dependency_dirs() -> list[str]:
    """This interpreter's site-packages folders (its own and any its .pth files add): where the dependencies are.
    Listed in the fresh venv's .pth they are plain path entries, so their own .pth files (an editable install's
    finder or path line) do not run there."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def _check_build_backend() -> None:
    """A clear early error when this interpreter's setuptools is below pyproject's build requirement."""
    requires = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]
    for requirement in map(Requirement, requires):
        if requirement.name == "setuptools":
            installed = metadata.version("setuptools")
            if not requirement.specifier.contains(installed):
                pytest.fail(f"setuptools {installed} does not meet {requirement}: pip install -e '.[test]'")


@dataclass(frozen=True)
class Install:
    """One fresh venv holding one built distribution."""

    kind: str  # "wheel" or "sdist"
    python: Path
    bin: Path
    site: Path  # the venv's site-packages
    home: Path  # an empty working folder outside the repo
    env: dict[str, str]

    def run(self, *args, timeout: int = 600) -> subprocess.CompletedProcess:
        return _run(list(args), cwd=self.home, env=self.env, timeout=timeout)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel, built once offline with this interpreter's setuptools from a copy of the clone's
    files (a build in the repo would reuse its build/ folder, whose stale files end up in the wheel)."""
    files = _source_files()
    _check_build_backend()
    root = tmp_path_factory.mktemp("build")
    for rel in files:
        (root / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / "src" / rel)
    # PEP 517 hooks, as pip and build call them; sys.argv is read first (the hooks rewrite it).
    code = (
        "import sys\nfrom setuptools import build_meta as b\nout = sys.argv[1]\nb.build_sdist(out)\nb.build_wheel(out)"
    )
    _run([sys.executable, "-c", code, root / "dist"], cwd=root / "src", timeout=300)
    [wheel], [sdist] = sorted((root / "dist").glob("*.whl")), sorted((root / "dist").glob("*.tar.gz"))
    return {"wheel": wheel, "sdist": sdist}


@pytest.fixture(scope="module", params=["wheel", "sdist"])
def installed(request, dists, tmp_path_factory) -> Install:
    """A fresh venv with the wheel, or the sdist (which pip builds into a wheel there), and no source tree."""
    root = tmp_path_factory.mktemp(f"venv-{request.param}")
    venv, home = root / "venv", root / "home"
    home.mkdir()
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env |= ENV | {"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([python, "-c", code], cwd=home, env=env, timeout=60).stdout.strip())
    (site / "_dependencies.pth").write_text("\n".join(_dependency_dirs()) + "\n", encoding="utf-8")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--disable-pip-version-check"]
    pip += ["--no-deps", "--no-index", "--no-build-isolation", "--no-cache-dir", dists[request.param]]
    _run(pip, cwd=home, env=env, timeout=300)
    return Install(request.param, python, venv / "bin", site, home, env)


@pytest.fixture(scope="module")
def walk(installed) -> dict:
    """Every module of the installed packages imported in the venv: name -> [status, traceback]."""
    return json.loads(installed.run(installed.python, "-c", WALK, ",".join(OPTIONAL)).stdout.splitlines()[-1])


def test_the_package_runs_from_the_venv_not_the_repo(installed, walk):
    for package in PACKAGES:
        assert Path(walk["files"][package]).is_relative_to(installed.site), walk["files"]


def test_the_installed_files_are_the_repos(installed):
    """Nothing left out (subpackages, probe texts, recipe YAMLs), nothing else installed (tests, benchmarks...)."""
    expected = {rel: _digest(REPO / rel) for rel in _package_files()}
    got = {
        path.relative_to(installed.site).as_posix(): _digest(path)
        for package in PACKAGES
        for path in (installed.site / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert sorted(set(expected) - set(got)) == [], "in the repo, not installed"
    assert sorted(set(got) - set(expected)) == [], "installed, not in the repo"
    assert sorted(rel for rel in expected if expected[rel] != got[rel]) == [], "installed content differs"
    top = {path.name for path in installed.site.iterdir() if path.name != "__pycache__"}
    assert {name for name in top if not name.endswith(".dist-info")} == {*PACKAGES, "_dependencies.pth"}


def test_the_walk_finds_exactly_the_repos_modules(walk):
    assert sorted(walk["modules"]) == _repo_modules()


@pytest.mark.parametrize("module", _repo_modules())
def test_every_installed_module_imports(walk, module):
    if module not in walk["modules"]:
        pytest.fail(f"{module} is in the repo but the walk of the installed package did not find it")
    status, trace = walk["modules"][module]
    if status.startswith("absent:"):
        name = status.partition(":")[2]
        pytest.skip(f"{module} needs {name}, {OPTIONAL[name]}, which is not installed here")
    assert status == "ok", trace


def test_console_scripts_and_entry_points_load(installed):
    """Each entry point pyproject declares resolves to an object of the installed package."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = [["console_scripts", name, value] for name, value in project["scripts"].items()]
    declared += [
        [group, name, value] for group, points in project["entry-points"].items() for name, value in points.items()
    ]
    found = json.loads(installed.run(installed.python, "-c", ENTRY_POINTS).stdout)
    assert Path(found["site"]) == installed.site  # the fresh install's metadata, not the editable one's
    assert found["points"] == sorted(declared)
    for name in project["scripts"]:
        assert (installed.bin / name).is_file(), name


def test_the_vllm_plugin_loads_its_sources_from_the_install(installed):
    """normalign_vllm loads a few hf_normalign files by path (normalign_vllm.core.SOURCES): they are where it looks."""
    code = (
        "import json\nfrom normalign_vllm import core\n"
        "[core.get(name, a) for name, (_, attributes) in core.SOURCES.items() for a in attributes]\n"
        "print(json.dumps([core.load(name).__file__ for name in core.SOURCES]))"
    )
    for path in json.loads(installed.run(installed.python, "-c", code).stdout):
        assert Path(path).is_relative_to(installed.site / "hf_normalign"), path


def test_normalign_help(installed):
    from hf_normalign.cli import COMMANDS

    for command in ([installed.bin / "normalign", "--help"], [installed.python, "-m", "hf_normalign", "--help"]):
        done = installed.run(*command, timeout=120)
        assert done.stdout.startswith("usage: normalign") and done.stderr == "", done.stderr
        assert all(name in done.stdout for name in COMMANDS)


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory) -> Path:
    """A tiny LLaVA and its processor saved as a user's model folder."""
    from hf_normalign.testing import tiny_model, tiny_processor

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llava").save_pretrained(path)
    tiny_processor("llava").save_pretrained(path)
    return path


MIR_ARGS = ("--num-samples", "4", "--device", "cpu", "--no-progress")


@pytest.fixture(scope="module")
def source_mir(tiny_saved, tmp_path_factory) -> dict:
    """`normalign mir` of the source tree (this process), the reference for the installed one."""
    from hf_normalign.cli import main

    out = tmp_path_factory.mktemp("mir") / "mir.json"
    assert main(["mir", str(tiny_saved), *MIR_ARGS, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_normalign_mir_on_a_saved_model(installed, tiny_saved, source_mir):
    out = installed.home / "mir.json"
    installed.run(installed.bin / "normalign", "mir", tiny_saved, *MIR_ARGS, "--json", out)
    result = json.loads(out.read_text())
    assert result["layers"] == source_mir["layers"] and len(result["layers"]) > 0
    assert result["per_layer"] == pytest.approx(source_mir["per_layer"], rel=1e-5)
    assert result["mir"] == pytest.approx(source_mir["mir"], rel=1e-5)


@pytest.mark.slow
def test_quick_demo(installed):
    if installed.kind == "sdist":
        pytest.skip("the sdist installs the wheel's files byte for byte (test_the_installed_files_are_the_repos)")
    out = installed.home / "demo"
    installed.run(installed.bin / "normalign", "demo", "--quick", "--no-progress", "--out", out, timeout=900)
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"]["equal"] is True  # the reloaded checkpoint gave the saved model's logits
    assert (out / "report.html").stat().st_size > 0
