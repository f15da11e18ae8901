"""Multi-process runs for the tests: launching under ``accelerate launch`` (2 CPU processes, gloo), the launched
side of the diagnostics comparisons, and the comparisons of a distributed training run with one process.

A diagnostics test module that is also run as a script calls :func:`compare_in_processes` from its ``__main__``
block; its fixture calls :func:`launch` with its own path. The training tests (DDP, FSDP, ZeRO-3) launch
themselves or the recipe with :func:`accelerate_launch` and compare with :func:`assert_same_saved_weights` and
:func:`assert_loads_like`."""

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

ACCELERATE_CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "hf_normalign", "recipes", "accelerate")


def compare_in_processes(path: str, cases: dict[str, Callable]) -> None:
    """In each launched process: every case distributed; on the main process also on one process; JSON to `path`.

    A case is ``run(model, processor, **kwargs)`` returning a result with ``to_dict()`` (None off the main process
    when given ``accelerator=``)."""
    from accelerate import Accelerator

    from hf_normalign.testing import tiny_model, tiny_processor

    accelerator = Accelerator(cpu=True)
    model, processor = tiny_model("llava"), tiny_processor("llava")
    report = {}
    for name, run in cases.items():
        distributed = run(model, processor, accelerator=accelerator)
        if accelerator.is_main_process:
            single = run(model, processor)
            report[name] = {"single": single.to_dict(), "distributed": distributed.to_dict()}
        else:
            assert distributed is None
    if accelerator.is_main_process:
        with open(path, "w") as f:
            json.dump(report, f)
    # Leave together and close the group: a rank that exits while the other still computes aborts in gloo's
    # teardown ("terminate called without an active exception"), which failed the launch now and then.
    accelerator.wait_for_everyone()
    accelerator.end_training()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(
    *args: str, config: str = "ddp_cpu.yaml", options: tuple[str, ...] = (), check: bool = True
) -> subprocess.CompletedProcess:
    """``accelerate launch`` of `args` (a script and its arguments, or ``-m`` and a module) with
    ``hf_normalign/recipes/accelerate/<config>`` (2 CPU processes) and launcher `options`; asserts success when
    `check`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [os.path.join(ACCELERATE_CONFIGS, config), *options, "--main_process_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def launch(script: str, path: str) -> dict:
    """Run `script` under :func:`accelerate_launch`; return the JSON it wrote to `path`."""
    accelerate_launch(os.path.abspath(script), str(path))
    with open(path) as f:
        return json.load(f)


# --- training runs ------------------------------------------------------------------------------------------------


# Stage 1 of the distributed training tests: MoCa starts far from the identity, so were its hooks skipped inside
# the wrapped decoder layers, the very first loss would differ from the single-process run's.
STAGE1_SETTINGS = json.dumps({"projector_norm": True, "moca": {"init_std": 0.5}, "pre": True})


def train_both_ways(root: Path, script: str, config: str) -> dict[int, tuple[Path, Path]]:
    """Stage 1 (all three methods) and stage 2 (full, from the single-process stage 1) of the tiny LLaVA, each on
    one process with batch 4 and launched as `script` (which runs the recipe) on 2 processes with batch 2 each,
    the same global batch. Returns ``{stage: (single-process output, two-process output)}``."""
    from hf_normalign.recipes import train
    from hf_normalign.recipes.make_tiny_data import make_tiny_data

    data = make_tiny_data(root / "tiny", num_samples=16, model="llava")
    model = root / "tiny" / "model"
    result = {}
    for stage, options in ((1, {"normalign_config": STAGE1_SETTINGS}), (2, {"learning_rate": 1e-3})):
        single, distributed = root / f"single{stage}", root / f"distributed{stage}"
        assert train.main(recipe_argv(model, data, single, 4, **options), stage=stage) == 0
        accelerate_launch(script, str(stage), *recipe_argv(model, data, distributed, 2, **options), config=config)
        result[stage] = single, distributed
        model = root / "single1"
    return result


def finish_launched(trainer, report: dict) -> None:
    """The end of a launched training process: its `report` to ``<output_dir>-rank<i>.json``, then leave together
    and close the process group (the recipe's own ending)."""
    from hf_normalign.recipes import train

    with open(f"{trainer.args.output_dir}-rank{trainer.args.process_index}.json", "w") as f:
        json.dump(report, f)
    train.finish(trainer)


def recipe_argv(model, data, out, batch_size: int, **options) -> list[str]:
    """A 4-step recipe run of the tiny data, checkpoint at the end; `options` add or override arguments."""
    values = {
        "model_name_or_path": model,
        "data_path": data,
        "output_dir": out,
        "use_cpu": "true",
        "per_device_train_batch_size": batch_size,
        "max_steps": 4,
        "save_steps": 4,
        "logging_steps": 1,
        "disable_tqdm": "true",
        "seed": 0,
    } | options
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def logged(output_dir, key: str, checkpoint: str = "checkpoint-4") -> list[float]:
    """The per-step values of `key` in a run's log history (the final summary entry left out)."""
    with open(os.path.join(output_dir, checkpoint, "trainer_state.json")) as f:
        entries = json.load(f)["log_history"]
    return [e[key] for e in entries if key in e and "train_runtime" not in e]


def rank_reports(output_dir) -> list[dict]:
    """What each of the two launched processes wrote to ``<output_dir>-rank<i>.json``."""
    reports = []
    for rank in (0, 1):
        with open(f"{output_dir}-rank{rank}.json") as f:
            reports.append(json.load(f))
    return reports


def assert_same_saved_weights(single: Path, other: Path, atol: float = 1e-6) -> None:
    """The plugin and model weights two runs saved are equal to `atol`."""
    for name in ("normalign.safetensors", "model.safetensors"):
        expected, got = load_file(single / name), load_file(other / name)
        assert expected.keys() == got.keys(), name
        for key, value in expected.items():
            where = f"{name}: {key}"
            torch.testing.assert_close(got[key], value, rtol=0, atol=atol, msg=lambda m, w=where: f"{w}: {m}")


def assert_loads_like(single: Path, other: Path) -> None:
    """``normalign.from_pretrained`` of `other` gives the model of `single`: the same trained plugin and logits."""
    import hf_normalign as normalign
    from hf_normalign.patching import get_plugin
    from hf_normalign.testing import tiny_batch

    a, b = normalign.from_pretrained(single).eval(), normalign.from_pretrained(other).eval()
    plugin_a, plugin_b = get_plugin(a).state_dict(), get_plugin(b).state_dict()
    assert plugin_a.keys() == plugin_b.keys()
    assert not torch.equal(plugin_b["moca.layer_0_norm.scale"], torch.ones_like(plugin_b["moca.layer_0_norm.scale"]))
    for key in plugin_a:
        torch.testing.assert_close(plugin_b[key], plugin_a[key], rtol=0, atol=1e-6)
    batch = tiny_batch(a)
    with torch.no_grad():
        torch.testing.assert_close(b(**batch).logits, a(**batch).logits, rtol=1e-5, atol=1e-5)
