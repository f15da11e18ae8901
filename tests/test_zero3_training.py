"""DeepSpeed ZeRO-3 (accelerate's DeepSpeed plugin, fp32) with two CPU processes (gloo): stage 1 and stage 2 (full)
of the tiny LLaVA with all three methods train like one process with the same global batch, and the 16-bit
gathered save is an aligned checkpoint. Runs where deepspeed is installed (its CPU accelerator); skipped elsewhere.

Run as a script, this file is the launcher the tests use: it runs the recipe, then reports how ZeRO-3 held the
plugin (``<output_dir>-rank<i>.json``). accelerate keeps the DeepSpeed engine on a CPU (unlike FSDP, see
tests/test_fsdp.py); the only change to the recipe's DeepSpeed config is ``stage3_param_persistence_threshold: 0``:
by default ZeRO-3 keeps every parameter under 1e5 elements whole on every rank, i.e. all of the tiny model, while
here every parameter, the plugin's included, is partitioned and gathered for each forward, as the large weights
of a real model are::

    accelerate launch --config_file recipes/accelerate/deepspeed_zero3_cpu.yaml tests/test_zero3_training.py 1 \\
        --config ... --use_cpu true
"""

import json
import sys

import pytest
import torch
from distributed import (
    accelerate_launch,
    assert_loads_like,
    assert_same_saved_weights,
    logged,
    rank_reports,
    recipe_argv,
)

pytest.importorskip("deepspeed")

from hf_normalign.patching import get_plugin

# isort: split
from hf_normalign.recipes import train
from hf_normalign.recipes.make_tiny_data import make_tiny_data

ZERO3_CONFIG = "deepspeed_zero3_cpu.yaml"
# MoCa starts far from the identity: were its hooks skipped inside the engine, the very first loss would differ.
STAGE1_SETTINGS = json.dumps({"projector_norm": True, "moca": {"init_std": 0.5}, "pre": True})


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
    with open(f"{trainer.args.output_dir}-rank{trainer.args.process_index}.json", "w") as f:
        json.dump(report, f)
    train.finish(trainer)


# --- tests -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{stage: (single-process output, ZeRO-3 output)}; stage 2 (full) starts from the single-process stage 1."""
    root = tmp_path_factory.mktemp("zero3")
    data = make_tiny_data(root / "tiny", num_samples=16, model="llava")
    model = root / "tiny" / "model"
    result = {}
    for stage, options in ((1, {"normalign_config": STAGE1_SETTINGS}), (2, {"learning_rate": 1e-3})):
        single, zero3 = root / f"single{stage}", root / f"zero3{stage}"
        assert train.main(recipe_argv(model, data, single, 4, **options), stage=stage) == 0
        # Two ZeRO-3 processes, half the per-device batch each: the same global batch as one process.
        accelerate_launch(__file__, str(stage), *recipe_argv(model, data, zero3, 2, **options), config=ZERO3_CONFIG)
        result[stage] = single, zero3
        model = root / "single1"
    return result


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
