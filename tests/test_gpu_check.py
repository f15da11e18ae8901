"""benchmarks/gpu_check.py refuses clearly, writing nothing, on a machine without CUDA."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gpu_check.py")


def test_without_cuda_it_exits_2_with_a_message_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU, so this holds on a GPU machine too
    done = subprocess.run([sys.executable, SCRIPT, "--json", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "needs a CUDA device" in done.stderr
    assert not out.exists()
