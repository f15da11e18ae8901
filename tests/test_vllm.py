"""vLLM serves aligned checkpoints (LLaVA, Qwen2-VL, Qwen2.5-VL) with LayerNorm and MoCa active (issue 16).

Runs only where vLLM is importable: ``bash scripts/make_vllm_env.sh && .vllm-venv/bin/python -m pytest
tests/test_vllm.py``. Each vLLM run is a child process (~30 s on 2 cores): vLLM loads its plugins once per process.
The reference is the patched transformers model, generating greedily one request at a time.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vLLM is not installed in this environment; run with the vLLM venv: bash scripts/make_vllm_env.sh && "
        ".vllm-venv/bin/python -m pytest tests/test_vllm.py",
        allow_module_level=True,
    )

import hf_normalign as normalign
from normalign_vllm.testing import PROMPTS, build_tiny_aligned, transformers_generate, vllm_generate

TRANSFORMERS_BACKEND = {"model_impl": "transformers"}


def _served(root, family: str) -> dict:
    """Folders of an aligned tiny ``family`` model (perturbed LayerNorm + MoCa) and its plain base, with references."""
    model, processor = build_tiny_aligned(family)
    aligned, base = str(root / "aligned"), str(root / "base")
    normalign.save_pretrained(model, aligned)
    processor.save_pretrained(aligned)
    expected_aligned = transformers_generate(model, processor, family=family)
    normalign.unpatch(model)
    model.save_pretrained(base)
    processor.save_pretrained(base)
    expected_base = transformers_generate(model, processor, family=family)
    # The plugin's parameters must matter, or token equality below would prove nothing.
    assert expected_aligned != expected_base
    assert len({len(p.split()) for p in PROMPTS}) == len(PROMPTS)
    return {
        "family": family,
        "aligned": aligned,
        "base": base,
        "expected": expected_aligned,
        "expected_base": expected_base,
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _served(tmp_path_factory.mktemp("llava"), "llava")


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen_checkpoint(tmp_path_factory, request):
    return _served(tmp_path_factory.mktemp(request.param), request.param)


def test_transformers_backend_matches_patched_transformers(checkpoint):
    (tokens,) = vllm_generate(checkpoint["aligned"], **TRANSFORMERS_BACKEND)
    assert tokens == checkpoint["expected"]


def test_without_the_plugin_the_same_checkpoint_is_not_served_as_aligned(checkpoint):
    # Plain vLLM reads normalign.safetensors as model weights and stops; it never serves the aligned
    # checkpoint. The base weights alone give other tokens (fixture), so the match above needs the plugin.
    with pytest.raises(RuntimeError, match="no module or parameter named '(moca|projector_norm)'"):
        vllm_generate(checkpoint["aligned"], plugins=False, **TRANSFORMERS_BACKEND)


def test_native_implementation_refuses_an_aligned_checkpoint(checkpoint):
    with pytest.raises(RuntimeError, match="--model-impl transformers"):
        vllm_generate(checkpoint["aligned"], model_impl="vllm")


def test_folder_without_normalign_config_is_served_as_the_base(checkpoint):
    (tokens,) = vllm_generate(checkpoint["base"], **TRANSFORMERS_BACKEND)
    assert tokens == checkpoint["expected_base"]


def test_compile_chunked_prefill_and_prefix_caching(checkpoint):
    # With at most 16 tokens a step, every image is split: the first prompt's 16 image tokens sit at positions
    # 8..23, the third's at 50..65. The second batch re-reads the cached prefixes (images included) instead of
    # recomputing them; the backbone runs compiled.
    first, second = vllm_generate(
        checkpoint["aligned"],
        repeats=2,
        enforce_eager=False,
        enable_chunked_prefill=True,
        max_num_batched_tokens=16,
        enable_prefix_caching=True,
        **TRANSFORMERS_BACKEND,
    )
    assert first == checkpoint["expected"]
    assert second == checkpoint["expected"]


def test_qwen_vl_matches_patched_transformers(qwen_checkpoint):
    # M-RoPE positions, the Qwen vision tower and its patch merger run in vLLM; 3 images, 19/38/59-token prompts.
    (tokens,) = vllm_generate(qwen_checkpoint["aligned"], family=qwen_checkpoint["family"], **TRANSFORMERS_BACKEND)
    assert tokens == qwen_checkpoint["expected"]


def test_qwen_vl_compile_chunked_prefill_and_prefix_caching(qwen_checkpoint):
    # 10 tokens a step split the first prompt's image (positions 9..12) between its first two steps.
    first, second = vllm_generate(
        qwen_checkpoint["aligned"],
        family=qwen_checkpoint["family"],
        repeats=2,
        enforce_eager=False,
        enable_chunked_prefill=True,
        max_num_batched_tokens=10,
        enable_prefix_caching=True,
        **TRANSFORMERS_BACKEND,
    )
    assert first == qwen_checkpoint["expected"]
    assert second == qwen_checkpoint["expected"]


def test_serve_openai_example(tmp_path):
    script = Path(__file__).resolve().parent.parent / "examples" / "serve_openai.py"
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = re.fullmatch(r"answer: .* \((\d+) tokens\)", proc.stdout.strip())
    assert tokens is not None and int(tokens.group(1)) >= 1, proc.stdout


def test_converted_original_llava_checkpoint_serves_with_moca(tmp_path):
    """Issue 23: an original-format LLaVA-1.5 + MoCa checkpoint after `normalign convert` is served with its MoCa:
    vLLM's tokens equal the patched transformers model's (which tests/test_convert.py proves equal to a by-hand
    forward of the original), and differ from the same weights without MoCa."""
    from transformers import AutoProcessor

    from hf_normalign.convert.llava_original import convert
    from hf_normalign.testing.llava_original import write_original

    src, _ = write_original(tmp_path)
    folder = str(tmp_path / "converted")
    convert(src, folder)
    model = normalign.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    expected = transformers_generate(model, processor)
    assert expected != transformers_generate(normalign.unpatch(model), processor)
    (tokens,) = vllm_generate(folder, **TRANSFORMERS_BACKEND)
    assert tokens == expected
