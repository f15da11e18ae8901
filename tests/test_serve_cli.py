"""`normalign serve` builds the `vllm serve` command (no vLLM needed)."""

from __future__ import annotations

from hf_normalign.cli import main


def test_serve_defaults_to_the_transformers_backend(capsys):
    assert main(["serve", "--dry-run", "out/ckpt", "--port", "8001"]) == 0
    assert capsys.readouterr().out.split() == [
        "vllm", "serve", "out/ckpt", "--model-impl", "transformers", "--port", "8001",
    ]  # fmt: skip


def test_serve_keeps_an_explicit_model_impl(capsys):
    assert main(["serve", "--dry-run", "out/ckpt", "--model-impl=vllm"]) == 0
    assert capsys.readouterr().out.split() == ["vllm", "serve", "out/ckpt", "--model-impl=vllm"]
