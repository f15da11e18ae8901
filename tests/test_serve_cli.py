"""`normalign serve` builds the OpenAI-server command (no vLLM needed)."""

from __future__ import annotations

import shlex
import sys

from hf_normalign.cli import main

SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "out/ckpt"]


def test_serve_defaults_to_the_transformers_backend(capsys):
    assert main(["serve", "--dry-run", "out/ckpt", "--port", "8001"]) == 0
    assert shlex.split(capsys.readouterr().out) == [*SERVER, "--model-impl", "transformers", "--port", "8001"]


def test_serve_keeps_an_explicit_model_impl(capsys):
    assert main(["serve", "--dry-run", "out/ckpt", "--model-impl=vllm"]) == 0
    assert shlex.split(capsys.readouterr().out) == [*SERVER, "--model-impl=vllm"]
