"""DeepSpeed ZeRO-3 (accelerate's DeepSpeed plugin, fp32) with two CPU processes (gloo): stage 1 and stage 2 (full)
of the tiny LLaVA with all three methods train like one process with the same global batch, and the 16-bit
gathered save is an aligned checkpoint. Runs where deepspeed is installed (its CPU accelerator); skipped elsewhere.

Run as a script, this file is the launcher the tests use: it runs the recipe, then reports how ZeRO-3 held the
plugin (``<output_dir>-rank<i>.json``). accelerate keeps the DeepSpeed engine on a CPU (unlike FSDP, see
tests/test_fsdp.py); the only change to the recipe's DeepSpeed config is ``stage3_param_persistence_threshold: 0``:
by default ZeRO-3 keeps every parameter under 1e5 elements whole on every rank, i.e. all of the tiny model, while
here every parameter, the plugin's included, is partitioned and gathered for each forward, as the large weights
of a real model are::

    accelerate launch --config_file hf_normalign/recipes/accelerate/deepspeed_zero3_cpu.yaml \\
        tests/test_zero3_training.py 1 \\
        --config ... --use_cpu true
"""

import sys

import pytest
import torch
from distributed import (
    STAGE1_SETTINGS,
    accelerate_launch,
    assert_loads_like,
    assert_same_saved_weights,
    finish_launched,
    logged,
    rank_reports,
    recipe_argv,
    train_both_ways,
)

pytest.importorskip("deepspeed")

from hf_normalign.patching import get_plugin

# isort: split
from hf_normalign.recipes import train

ZERO3_CONFIG = "deepspeed_zero3_cpu.yaml"


def _launched(stage: int, argv: list[str]) -> None:
    """One ZeRO-3 process: train, then report how the plugin was partitioned (``<output_dir>-rank<i>.json``)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    config = train.parse_args(argv, stage=stage)
    config.training.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    trainer = train.run(config)
    plugin = get_plugin(trainer.model)
    parameters = list(plugin.parameters())
    report = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "engine": type(trainer.model_wrapped).__name__,
        "zero_stage": trainer.model_wrapped.zero_optimization_stage(),
        "plugin_partitioned": all(hasattr(p, "ds_id") for p in parameters),
        # Outside a forward, a partitioned parameter is released: its data is an empty placeholder.
        "plugin_released": all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0 for p in parameters),
        "plugin_dtypes": sorted({str(p.ds_tensor.dtype) for p in parameters}),
        "plugin_local_numel": sum(p.ds_tensor.numel() for p in parameters),
        "plugin_numel": sum(p.ds_numel for p in parameters),
    }
    finish_launched(trainer, report)


# --- tests -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{stage: (single-process output, two-process output)}."""
    return train_both_ways(tmp_path_factory.mktemp("zero3"), __file__, ZERO3_CONFIG)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero3_partitions_the_plugin_in_fp32(runs, stage):
    """The plugin is trained inside a ZeRO-3 engine: each rank holds half of it, in fp32, and releases it."""
    for report in rank_reports(runs[stage][1]):
        assert report["distributed_type"] == "DistributedType.DEEPSPEED"
        assert report["engine"] == "DeepSpeedEngine" and report["zero_stage"] == 3
        assert report["plugin_partitioned"] and report["plugin_released"]
        assert report["plugin_dtypes"] == ["torch.float32"]
        assert report["plugin_local_numel"] * 2 == report["plugin_numel"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero3_trains_like_one_process(runs, stage):
    """Gradient norm, loss and pre_loss per step, and the saved weights (gathered for the 16-bit save) equal one
    process's: the updates match, the plugin included."""
    single, zero3 = runs[stage]
    for key in ("grad_norm", "loss", "pre_loss"):
        expected, got = logged(single, key), logged(zero3, key)
        assert len(got) == 4, key
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0, msg=key)
    assert_same_saved_weights(single, zero3)


@pytest.mark.slow
def test_zero3_checkpoint_loads_as_an_aligned_model(runs):
    """``normalign.from_pretrained`` of the ZeRO-3 output gives the single-process model: same plugin and logits."""
    assert_loads_like(*runs[1])


@pytest.mark.slow
def test_zero3_save_without_gathering_refuses_before_training(runs, tmp_path):
    """Without the 16-bit gathered save the Trainer would hand save_pretrained no weights and the plugin holds only
    ZeRO-3 placeholders: NormAlignCallback refuses at train begin, naming the fix, before any step or checkpoint
    (the save itself also refuses 0-element weights: tests/test_zero3.py)."""
    data = runs[1][0].parent / "tiny"
    out = tmp_path / "zero3"
    argv = recipe_argv(data / "model", data / "data.json", out, 2, normalign_config=STAGE1_SETTINGS)
    options = ("--zero3_save_16bit_model", "false")
    done = accelerate_launch(__file__, "1", *argv, config=ZERO3_CONFIG, options=options, check=False)
    assert done.returncode != 0
    assert "ZeRO-3 is set to save without gathering the weights" in done.stderr
    assert "zero3_save_16bit_model: true" in done.stderr
    assert not list(out.rglob("checkpoint-*")) and not list(out.rglob("normalign.safetensors"))


if __name__ == "__main__":
    _launched(int(sys.argv[1]), sys.argv[2:])
