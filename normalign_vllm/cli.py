"""``normalign serve CHECKPOINT [VLLM ARGS...]``: ``vllm serve`` with the transformers backend by default.

The plugin itself does the work inside vLLM; this only picks ``--model-impl transformers`` (the implementation
hf-normalign supports) unless the caller chose one, and replaces this process with ``vllm serve``::

    normalign serve out/aligned-llava --max-model-len 4096 --port 8000
    normalign serve --dry-run out/aligned-llava          # print the command only (options go before CHECKPOINT)
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys


def vllm_command(checkpoint: str, vllm_args: list[str]) -> list[str]:
    """The ``vllm serve`` command line for ``checkpoint``."""
    chosen = any(arg == "--model-impl" or arg.startswith("--model-impl=") for arg in vllm_args)
    return ["vllm", "serve", checkpoint, *([] if chosen else ["--model-impl", "transformers"]), *vllm_args]


def run(args: argparse.Namespace) -> int:
    command = vllm_command(args.checkpoint, args.vllm_args)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    # The `vllm` beside this interpreter first: a venv's bin/ is often not on PATH.
    beside = os.path.join(os.path.dirname(sys.executable), "vllm")
    executable = beside if os.access(beside, os.X_OK) else shutil.which("vllm")
    if executable is None:
        raise SystemExit(
            "normalign serve: the `vllm` command is not on PATH. Install vLLM beside hf-normalign "
            "(pip install 'hf-normalign[vllm]'; on CPU: bash scripts/make_vllm_env.sh, then run "
            ".vllm-venv/bin/normalign serve ...)."
        )
    os.execv(executable, command)
    return 0  # not reached: execv replaces the process


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an aligned checkpoint with vLLM (OpenAI-compatible server)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="folder (or Hub repo id) of an aligned checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="print the vllm command instead of running it")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="passed on to `vllm serve` unchanged")
    parser.set_defaults(func=run)
