"""Every script in examples/ runs, offline, and prints what it promises."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_example_has_a_test():
    tested = {
        "patch_from_hub.py",
        "mir_local_model.py",
        "trainer_mir_callback.py",
        "qlora_plugin.py",
        "push_to_hub_staging.py",
        "trl_sft.py",
        "trl_dpo.py",
        "trl_grpo.py",
        "serve_openai.py",  # tests/test_vllm.py (needs the vLLM environment)
        "vlmevalkit_launcher.py",
    }
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("args", [("--tiny",), ("--model", "llava-hf/llava-1.5-7b-hf")])
def test_patch_from_hub(tmp_path, args):
    out = run("patch_from_hub.py", *args, cwd=tmp_path)
    before, after = out.split("entering the LLM: ")[1].split(" (")[0].split(" -> ")
    target = float(out.split("T = ")[1].split(")")[0])
    assert float(before) > 5 * target and abs(float(after) - target) < 0.05 * target


def test_vlmevalkit_launcher(tmp_path):
    assert "loaded LlavaForConditionalGeneration; patched: True" in run(
        "vlmevalkit_launcher.py", "--tiny", cwd=tmp_path
    )


def test_mir_local_model(tmp_path):
    out = run("mir_local_model.py", "--tiny", "--num-samples", "8", cwd=tmp_path)
    assert "MIR = " in out and "over 8 image-text pairs" in out


def test_trainer_mir_callback(tmp_path):
    out = run("trainer_mir_callback.py", "--steps", "4", "--every", "2", cwd=tmp_path)
    assert out.count("MIR ") == 2


def test_qlora_plugin(tmp_path):
    out = run("qlora_plugin.py", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert "reloaded logits equal: True; plugin dtypes: {torch.float32}" in out
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "normalign.safetensors").exists()


def test_push_to_hub_staging(tmp_path):
    out = run("push_to_hub_staging.py", "--out", str(tmp_path / "staged"), cwd=tmp_path)
    files = out.split("would upload:\n")[1].split("\n\n")[0].split()
    assert files == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "normalign.safetensors",
        "normalign_config.json",
        "README.md",
    ]
    assert "without the intervention" in out and "| `gwc` | `true` |" in out


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("script", ["trl_sft.py", "trl_dpo.py"])
def test_trl_sft_dpo(tmp_path, script, lora):
    out = run(script, "--out", str(tmp_path / "out"), *(["--lora"] if lora else []), cwd=tmp_path)
    assert out.count("step ") == 4
    assert (tmp_path / "out" / "normalign.safetensors").exists()
    assert (tmp_path / "out" / ("adapter_model.safetensors" if lora else "model.safetensors")).exists()
    assert (tmp_path / "out" / "checkpoint-2" / "normalign.safetensors").exists()


def test_trl_grpo(tmp_path):
    out = run("trl_grpo.py", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert "step 1: reward" in out and "kl 0.000000" in out.split("step 2")[0]
