"""Norm profile, key-space gap (capped sample, and keys after RoPE) and visual degradation over two CPU processes
(gloo, ``accelerate launch``) equal one process's result: the probe runner splits the batches and merges the
accumulators exactly.

Run as a script, this file is what each launched process does: every process computes the distributed results,
and the main process then also computes the one-process results on the whole probe, with the same thread count."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest

DDP_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "recipes", "accelerate", "ddp_cpu.yaml")
COMMON = {"num_samples": 10, "batch_size": 3, "progress": False}  # 4 batches, the last one short


def _cases():
    from hf_normalign.diagnostics import key_space_gap, modality_profile, visual_degradation

    return {
        "profile": lambda m, p, **k: modality_profile(m, p, **COMMON, **k),
        "key_space_capped": lambda m, p, **k: key_space_gap(m, p, max_samples=40, bins=3, **COMMON, **k),
        "key_space_post_rope": lambda m, p, **k: key_space_gap(m, p, keys="post_rope", max_samples=None, **COMMON, **k),
        "degradation": lambda m, p, **k: visual_degradation(m, p, folds=2, **COMMON, **k),
    }


def _launched(path: str) -> None:
    from accelerate import Accelerator

    from hf_normalign.testing import tiny_model, tiny_processor

    accelerator = Accelerator(cpu=True)
    model, processor = tiny_model("llava"), tiny_processor("llava")
    report = {}
    for name, run in _cases().items():
        distributed = run(model, processor, accelerator=accelerator)
        if accelerator.is_main_process:
            single = run(model, processor)
            report[name] = {"single": single.to_dict(), "distributed": distributed.to_dict()}
        else:
            assert distributed is None
    if accelerator.is_main_process:
        with open(path, "w") as f:
            json.dump(report, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("diagnostics") / "report.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", DDP_CONFIG]
    command += ["--main_process_port", str(_free_port()), os.path.abspath(__file__), str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(path.read_text())


def _assert_close(distributed, single, where=""):
    """Equal structure; numbers equal to 1e-10 relative (float64 sums taken in another order)."""
    if isinstance(single, dict):
        assert distributed.keys() == single.keys(), where
        for key in single:
            _assert_close(distributed[key], single[key], f"{where}.{key}")
    elif isinstance(single, list):
        assert len(distributed) == len(single), where
        for i, (d, s) in enumerate(zip(distributed, single, strict=True)):
            _assert_close(d, s, f"{where}[{i}]")
    elif isinstance(single, float) and math.isfinite(single):
        assert distributed == pytest.approx(single, rel=1e-10, abs=1e-12), where
    else:
        assert distributed == single, where


@pytest.mark.slow
@pytest.mark.parametrize("case", ["profile", "key_space_capped", "key_space_post_rope", "degradation"])
def test_two_processes_give_the_single_process_result(report, case):
    single, distributed = report[case]["single"], report[case]["distributed"]
    assert single["num_samples" if "num_samples" in single else "num_images"] == 10
    if case == "key_space_capped":  # the cap is reached: the sampled keys had to be merged, not just stacked
        assert single["num_vision_used"][0] == 40 < single["num_vision_keys"][0]
    _assert_close(distributed, single, case)


if __name__ == "__main__":
    _launched(sys.argv[1])
