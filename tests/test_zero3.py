"""patch() refuses a model whose parameters DeepSpeed ZeRO-3 partitioned at construction (deepspeed.zero.Init),
naming the fix (runs where deepspeed is installed: its CPU accelerator, one gloo process); saving refuses the
empty placeholders ZeRO-3 leaves in the plugin outside a forward (training under ZeRO-3: test_zero3_training.py)."""

import os
import subprocess
import sys

import pytest
import torch
from distributed import free_port

import hf_normalign as normalign
from hf_normalign.patching import get_plugin
from hf_normalign.testing import tiny_model


def _launched() -> None:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    keep = HfDeepSpeedConfig(ds_config)  # transformers builds models ZeRO-3-aware while this object lives
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = tiny_model("llava")
    assert all(p.numel() == 0 for p in model.parameters()), "expected ZeRO-3 placeholders"
    with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3.*zero3_init_flag: false"):
        normalign.patch(model, methods=["projector_norm", "moca", "pre"])
    del keep


@pytest.mark.slow
def test_patch_refuses_a_zero3_partitioned_model():
    pytest.importorskip("deepspeed")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    command += ["--master_port", str(free_port()), os.path.abspath(__file__)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("adapter_only", [False, True])
def test_save_refuses_zero3_placeholders(tmp_path, adapter_only):
    """A plugin parameter released by ZeRO-3 (its data an empty placeholder, as deepspeed leaves it) is not saved
    as a 0-element weight: both save paths raise, naming the gathered save, and write nothing."""
    model = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca", "pre"])
    get_plugin(model).moca.layer_0_norm.scale.data = torch.empty(0)
    with pytest.raises(ValueError, match=r"moca\.layer_0_norm\.scale.*empty.*zero3_save_16bit_model: true"):
        if adapter_only:
            normalign.save_pretrained(model, tmp_path / "out", adapter_only=True, base_model_name_or_path="base")
        else:
            model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


if __name__ == "__main__":
    _launched()
