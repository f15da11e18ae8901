"""Two-process runs of diagnostics for the tests: the launched side and the launching side.

A test module that is also run as a script (by ``accelerate launch``) calls :func:`compare_in_processes` from its
``__main__`` block; its fixture calls :func:`launch` with its own path."""

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable

DDP_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "recipes", "accelerate", "ddp_cpu.yaml")


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
    import torch.distributed

    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` with 2 CPU processes (gloo) of `args` (a script and its arguments, or ``-m`` and a
    module); asserts it succeeded."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", DDP_CONFIG]
    command += ["--main_process_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def launch(script: str, path: str) -> dict:
    """Run `script` under :func:`accelerate_launch`; return the JSON it wrote to `path`."""
    accelerate_launch(os.path.abspath(script), str(path))
    with open(path) as f:
        return json.load(f)
