"""FSDP2 (accelerate's FSDP plugin) with two CPU processes (gloo): stage 1 and stage 2 (full) of the tiny LLaVA with
all three methods train like one process with the same global batch, and save an aligned checkpoint.

Run as a script, this file is the launcher the tests use: accelerate 1.15 turns ``use_cpu`` into DDP (MULTI_CPU)
and drops the FSDP plugin on a CPU, so :func:`_keep_fsdp_on_cpu` puts the FSDP distributed type back after
accelerate set its state up; the sharding, the FSDP2 training step and the full-state-dict save are accelerate's
and torch's own code::

    accelerate launch --config_file hf_normalign/recipes/accelerate/fsdp_cpu.yaml tests/test_fsdp.py 1 \\
        --config ... --use_cpu true
"""

import sys

import pytest
import torch
from distributed import (
    assert_loads_like,
    assert_same_saved_weights,
    finish_launched,
    logged,
    rank_reports,
    train_both_ways,
)

from hf_normalign.patching import get_plugin

# isort: split
from hf_normalign.recipes import train


def _keep_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # The Trainer re-reads the shared PartialState later; without this it falls back to MULTI_CPU.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init_with_fsdp


def _launched(stage: int, argv: list[str]) -> None:
    """One FSDP process: train, then report how the plugin was sharded (``<output_dir>-rank<i>.json``)."""
    from torch.distributed.tensor import DTensor

    _keep_fsdp_on_cpu()
    trainer = train.run(train.parse_args(argv, stage=stage))
    plugin = get_plugin(trainer.model)
    report = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "model_class": type(trainer.model).__name__,
        "plugin_sharded": all(isinstance(p, DTensor) for p in plugin.parameters()),
        "plugin_dtypes": sorted({str(p.dtype) for p in plugin.parameters()}),
        "plugin_local_numel": sum(p.to_local().numel() for p in plugin.parameters()),
        "plugin_numel": sum(p.numel() for p in plugin.parameters()),
    }
    finish_launched(trainer, report)


# --- tests -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{stage: (single-process output, two-process output)}."""
    return train_both_ways(tmp_path_factory.mktemp("fsdp"), __file__, "fsdp_cpu.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_fsdp_shards_the_plugin_in_fp32(runs, stage):
    """The plugin is part of the FSDP2 root unit: each rank holds half of every plugin parameter, in fp32."""
    for report in rank_reports(runs[stage][1]):
        assert report["distributed_type"] == "DistributedType.FSDP"
        assert report["model_class"].startswith("FSDP")  # fully_shard swaps in an FSDP subclass
        assert report["plugin_sharded"] and report["plugin_dtypes"] == ["torch.float32"]
        assert report["plugin_local_numel"] * 2 == report["plugin_numel"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_fsdp_trains_like_one_process(runs, stage):
    """Gradient norm per step and the saved weights (gathered on rank 0) equal one process's: the updates match."""
    single, fsdp = runs[stage]
    expected, got = logged(single, "grad_norm"), logged(fsdp, "grad_norm")
    assert len(got) == 4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert_same_saved_weights(single, fsdp)


@pytest.mark.slow
def test_fsdp_logs_like_one_process(runs):
    single, fsdp = runs[1]
    for key in ("loss", "pre_loss"):
        torch.testing.assert_close(logged(fsdp, key), logged(single, key), rtol=1e-5, atol=0, msg=key)


@pytest.mark.slow
def test_fsdp_checkpoint_loads_as_an_aligned_model(runs):
    """``normalign.from_pretrained`` of the FSDP output gives the single-process model: same plugin, same logits."""
    assert_loads_like(*runs[1])


if __name__ == "__main__":
    _launched(int(sys.argv[1]), sys.argv[2:])
