"""The `normalign` command line (also `python -m hf_normalign`).

Every subcommand is a :class:`Command` in :data:`COMMANDS`: its options (argparse only, defined here with the
option types of :mod:`hf_normalign.cli_types`, so that ``normalign --help`` and ``normalign COMMAND --help`` import
neither torch nor transformers) and the runner ``"hf_normalign.commands.<name>:run"``, imported only when the
command runs. Adding a subcommand is one entry here and one module in :mod:`hf_normalign.commands`.

Exit codes, one rule for every subcommand: 0 success; 2 a usage error (an unknown option, a bad value, a local
path that does not exist, a missing input or an output folder that cannot be written, all found before anything is
imported or loaded); 1 a failure while working (a model that does not load, no network, a missing optional
package). Either way stderr gets one line naming the problem and the fix; ``--debug`` shows the traceback instead.

Output (:mod:`hf_normalign.console`): a command's results go to stdout through ``console.emit``; while it runs,
anything else printed to stdout (a library's chatter, such as DeepSpeed's start-up warning) goes to stderr, and
Python warnings are shown as one line ``normalign COMMAND: warning: ...``, so scripts can parse stdout.

Example:
    $ normalign patch llava-hf/llava-1.5-7b-hf --methods projector_norm,moca --out aligned
    $ normalign mir aligned --num-samples 50 --json results/mir.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from .cli_types import (
    DTYPES,
    MIR_PRESETS,
    OUTLIER_MODES,
    OUTLIER_STATS,
    REPORT_METRICS,
    SQRT_METHODS,
    TEXT_TOKENS,
    aligned_dir,
    config_file,
    existing_dir,
    hub_repo_id,
    layer_list,
    log_base,
    method_list,
    metric_list,
    model_source,
    output_dir,
    output_file,
    pair_count,
    positive_int,
)
from .console import command_output, one_line_text

DISTRIBUTION = "hf-normalign"
OWN_PACKAGES = ("hf_normalign", "normalign_vllm")  # the top-level packages of the distribution
# Import name -> distribution name, where they differ, for the requirements in pyproject.toml.
MODULE_DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml"}


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, its options, the ``"module:function"`` that runs it, and ``check``: the
    checks across options (a usage-error message, or None), run after parsing and before ``run`` is imported."""

    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: str
    check: Callable[[argparse.Namespace], str | None] | None = None


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="the small run (under 3 minutes on 2 CPU cores)")
    p.add_argument("--out", type=output_dir, default="normalign-demo", help="output folder (default: normalign-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, models, batches (default 0)")
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help="runs with seeds seed, seed+1, ... (default 3; --quick: 1)",
    )
    p.add_argument("--steps", type=positive_int, default=None, help="stage-1 steps per variant (default: the preset's)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads (default 1: fastest here)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _patch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", type=model_source, help="local directory or Hub repo id of the base VLM")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--methods", type=method_list, help="comma-separated methods: projector_norm,moca,pre")
    which.add_argument("--config", type=config_file, metavar="JSON", help="a NormAlignConfig as a JSON file")
    p.add_argument("--out", required=True, type=output_dir, metavar="DIR", help="output directory")
    p.add_argument("--adapter-only", action="store_true", help="write only the hf-normalign files")
    p.add_argument(
        "--include", default="projector", help="adapter-only: modules saved with the plugin (comma-separated)"
    )
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load with")
    p.add_argument("--revision", help="Hub revision of MODEL")


def _push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=aligned_dir, metavar="DIR", help="directory written by save_pretrained / patch")
    p.add_argument("repo_id", metavar="REPO_ID", type=hub_repo_id, help="target repo, e.g. me/llava-normalign")
    p.add_argument("--adapter-only", action="store_true", help="expect DIR to hold an adapter (fails on a full one)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", help="Hub token (default: the logged-in one)")
    p.add_argument("--revision", help="branch to push to")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--mir", type=float, help="MIR of the model, shown in the model card")


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=existing_dir, help="image folder of your probe set (with --texts)")
    p.add_argument("--texts", help="text file (one passage per line), .jsonl, or folder of .txt files")
    p.add_argument("--num-samples", type=pair_count, default=100, help="image-text pairs to use (default 100)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (device map); default: cuda if available")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--no-progress", action="store_true")


def _mir_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", type=model_source, help="model directory or Hub repo id (loaded with AutoModelForImageTextToText)"
    )
    _probe_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the probe subset and the built-in images")
    p.add_argument("--layers", type=layer_list, help="layers, e.g. 1-8,-1 (default: all decoder layers)")
    p.add_argument("--include-embeddings", action="store_true", help="also use layer 0, the LLM input")
    p.add_argument(
        "--preset",
        choices=MIR_PRESETS,
        help="reference: the official script's recipe (vicuna_v1 prompt, text after the image, torch statistics)",
    )
    p.add_argument("--outliers", choices=OUTLIER_MODES, default="replace_median")
    p.add_argument("--outlier-stats", choices=OUTLIER_STATS, default="torch", help="torch (reference) or numpy")
    p.add_argument("--text-tokens", choices=TEXT_TOKENS, help="passage (default) or after_image")
    p.add_argument("--no-text-scale", action="store_true", help="skip the text-centric scale (ablation)")
    p.add_argument("--sqrt", choices=SQRT_METHODS, default="exact")
    p.add_argument("--log-base", type=log_base, default=10.0, help="base of the logarithm (default 10)")
    p.add_argument("--no-final-norm", action="store_true", help="last layer before the final norm")
    p.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bounded-memory mode (drop/none outliers; default on for those)",
    )
    p.add_argument("--prompt", help="prompt with {text} and the image placeholder (default: chat template)")
    p.add_argument("--load-in-4bit", action="store_true", help="quantise with bitsandbytes (nf4)")
    p.add_argument("--json", type=output_file, help="write the result as JSON here")


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=model_source, help="model directory or Hub repo id (aligned checkpoints load patched)")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        type=model_source,
        metavar="MODEL2",
        help="another model to overlay (repeatable)",
    )
    p.add_argument("--out", required=True, type=output_dir, help="output folder")
    p.add_argument(
        "--metrics", type=metric_list, default=list(REPORT_METRICS), help=f"subset of {','.join(REPORT_METRICS)}"
    )
    _probe_arguments(p)
    p.add_argument("--degradation-samples", type=positive_int, default=60, help="labelled shapes images (default 60)")
    p.add_argument("--key-layers", type=layer_list, help="decoder layers of the key-space gap, e.g. 1-8,-1")
    p.add_argument("--max-key-samples", type=positive_int, default=2000, help="keys per modality and layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default="hf-normalign diagnostics")


def _check_probe(args: argparse.Namespace) -> str | None:
    if (args.images is None) != (args.texts is None):
        return "--images and --texts go together: give both (your probe set) or neither (the built-in probe)"
    return None


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=model_source, help="folder (or Hub repo id) of an aligned checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the server command instead of running it")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="`vllm serve` options, passed on unchanged")


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SRC", help="folder or Hub id of an original-format LLaVA-1.5 checkpoint")
    p.add_argument("out", metavar="OUT", type=output_dir, help="output folder")
    p.add_argument(
        "--vision-tower", metavar="ID_OR_PATH", help="CLIP vision tower (default: the config's mm_vision_tower)"
    )
    p.add_argument("--revision", help="Hub revision of SRC")


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "run the miniature alignment experiment offline",
        "Stage-1 alignment of baseline, projector_norm (with and without GWC), moca, pre and all three on a "
        "synthetic captioning task, offline on CPU. Writes report.html, results.json, diagnostics/ and "
        "checkpoint/ to --out and prints the results table.",
        _demo_arguments,
        "hf_normalign.commands.demo:run",
    ),
    "patch": Command(
        "patch a model and save the aligned checkpoint",
        "Load MODEL (a directory or Hub repo id), patch it and save an aligned checkpoint to --out.",
        _patch_arguments,
        "hf_normalign.commands.patch:run",
    ),
    "push": Command(
        "upload an aligned checkpoint or adapter to the Hub",
        "Upload the aligned checkpoint or adapter in DIR to REPO_ID, in one commit with a model card.",
        _push_arguments,
        "hf_normalign.commands.push:run",
    ),
    "mir": Command(
        "Modality Integration Rate of a model",
        "MIR of a VLM (local path or Hub id): per-layer FID table, the MIR, optional JSON.",
        _mir_arguments,
        "hf_normalign.commands.mir:run",
        _check_probe,
    ),
    "report": Command(
        "HTML report of the modality-gap diagnostics",
        "Norm / update-rate profiles, MIR, key-space gap and visual degradation of MODEL (and of each --compare "
        "model, overlaid) as report.html + PNG plots + report.json in --out.",
        _report_arguments,
        "hf_normalign.commands.report:run",
        _check_probe,
    ),
    "convert": Command(
        "convert an original-format LLaVA-1.5 (+ MoCa) checkpoint",
        "Convert SRC, a checkpoint of the LLaVA training repository (LlavaLlamaForCausalLM, e.g. "
        "shikiw/LLaVA-v1.5-MoCa-7B), into a transformers LlavaForConditionalGeneration in OUT, with MoCa as the "
        "hf-normalign plugin, <image>/<pad> added to the tokenizer and a processor that pads images to a square.",
        _convert_arguments,
        "hf_normalign.commands.convert:run",
    ),
    "serve": Command(
        "serve an aligned checkpoint with vLLM (OpenAI-compatible server)",
        "vLLM's OpenAI-compatible server on CHECKPOINT with the hf-normalign plugin active (transformers backend "
        "unless --model-impl is given). Options for vLLM go after CHECKPOINT; see docs/serving.md.",
        _serve_arguments,
        "normalign_vllm.cli:run",
    ),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line (argparse prints the usage first): the problem, and where the fix is documented."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normalign", description="Fix and measure the modality gap in VLMs.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.description)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback")
        command.arguments(sub)
    return parser


# --- errors ------------------------------------------------------------------------------------------------------


@functools.cache
def _requirements() -> dict[str, list[str]]:
    """Extra -> the distributions it installs (normalised names), ``""`` -> the required ones, read from the
    installed metadata (pyproject.toml's dependencies); empty when hf-normalign is not installed."""
    from packaging.requirements import Requirement

    try:
        texts = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    out: dict[str, list[str]] = {}
    for text in texts:
        requirement = Requirement(text)
        extras = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", str(requirement.marker or "")) or [""]
        for extra in extras:
            out.setdefault(extra, []).append(_normalise(requirement.name))
    return out


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _extra_for(distribution: str) -> str | None:
    """The smallest extra that installs ``distribution`` (``peft`` rather than ``trl`` or ``test``)."""
    holders = [(len(d), extra) for extra, d in _requirements().items() if extra and distribution in d]
    return min(holders)[1] if holders else None


def _importer(err: BaseException) -> str | None:
    """The module whose import statement failed: the innermost frame of the traceback outside importlib."""
    name, tb = None, err.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if not module.startswith(("importlib", "_frozen_importlib")):
            name = module
        tb = tb.tb_next
    return name


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken entry in sys.modules
        return False


def _missing_module(err: ModuleNotFoundError) -> str:
    """What a missing module means, with the fix: hf-normalign itself installed incompletely, an optional extra
    not installed, a required dependency missing, another package installed incompletely, or an unknown module."""
    name = err.name or ""
    top = name.split(".")[0]
    if top in OWN_PACKAGES:
        return (
            f"hf-normalign is installed incompletely: module {name!r} missing; reinstall: "
            f"pip install --force-reinstall {DISTRIBUTION}"
        )
    distribution = _normalise(MODULE_DISTRIBUTIONS.get(top, top))
    if name != top and _installed(top):  # the package is there, a part of it is not
        return (
            f"module {name!r} is missing from the installed package {top!r} (an incomplete install or an "
            f"unsupported version): reinstall it: pip install --force-reinstall {distribution}"
        )
    extra = _extra_for(distribution)
    if extra is not None:
        return f"the optional package {top!r} is not installed: pip install '{DISTRIBUTION}[{extra}]'"
    importer = _importer(err)
    by = f" (imported by {importer})" if importer and importer != "__main__" else ""
    if distribution in _requirements().get("", []):
        return f"hf-normalign's dependency {top!r} is not installed{by}: reinstall: pip install {DISTRIBUTION}"
    return f"the module {top!r} is not installed{by}"


def _one_line(err: BaseException) -> str:
    if isinstance(err, ModuleNotFoundError) and err.name:
        return _missing_module(err)
    return one_line_text(str(err)) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    command, prog = COMMANDS[args.command], f"normalign {args.command}"
    problem = command.check(args) if command.check else None
    if problem:  # a usage error found before anything is imported or loaded
        parser.exit(2, f"{prog}: error: {problem} (see {prog} --help)\n")
    module, function = command.run.split(":")
    try:
        with command_output(prog):
            return int(getattr(importlib.import_module(module), function)(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
