"""MIR over two CPU processes (gloo, ``accelerate launch``) equals one process's MIR to 1e-10 relative, for the
stored-features path (3-sigma replace-median, also captured group by group) and both streaming modes.

Run as a script, this file is what each launched process does: every process computes the distributed MIR, and
the main process then also computes the one-process MIR on the whole probe, with the same thread count."""

import json
import os
import socket
import subprocess
import sys

import pytest

CASES = {
    "replace_median": {"outliers": "replace_median"},
    "replace_median_grouped": {"outliers": "replace_median", "max_feature_gb": 1e-9},  # one layer per pass
    "none": {"outliers": "none"},
    "drop": {"outliers": "drop"},
}
DDP_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "recipes", "accelerate", "ddp_cpu.yaml")


def _launched(path: str) -> None:
    from accelerate import Accelerator

    from hf_normalign.diagnostics import mir
    from hf_normalign.testing import tiny_model, tiny_processor

    accelerator = Accelerator(cpu=True)
    model, processor = tiny_model("llava"), tiny_processor("llava")
    common = {"num_samples": 10, "batch_size": 3, "progress": False}  # 4 batches, the last one short
    report = {}
    for name, options in CASES.items():
        distributed = mir(model, processor, accelerator=accelerator, **common, **options)
        if accelerator.is_main_process:
            single = mir(model, processor, **common, **options)
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
    path = tmp_path_factory.mktemp("mir") / "report.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", DDP_CONFIG]
    command += ["--main_process_port", str(_free_port()), os.path.abspath(__file__), str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_give_the_single_process_mir(report, case):
    single, distributed = report[case]["single"], report[case]["distributed"]
    assert distributed["num_samples"] == single["num_samples"] == 10
    for key in ("num_vision_tokens", "num_text_tokens", "num_vision_outliers", "num_text_outliers"):
        assert distributed[key] == single[key], key
    assert distributed["mir"] == pytest.approx(single["mir"], rel=1e-10, abs=0)
    assert distributed["per_layer"] == pytest.approx(single["per_layer"], rel=1e-10, abs=0)
    assert distributed["text_scale"] == pytest.approx(single["text_scale"], rel=1e-12, abs=0)


if __name__ == "__main__":
    _launched(sys.argv[1])
