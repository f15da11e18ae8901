"""MIR on several CPU processes vs one: wall time of the ``normalign mir`` command, side by side in one run.

The same command on the same saved model and probe, each in a fresh process (so each number includes start-up
and model loading, as a user sees it):

1. one process, one torch thread;
2. one process, ``--procs`` threads (the same cores as 3);
3. ``accelerate launch`` with ``--procs`` CPU processes of one thread each: the probe is split between them and
   the statistics merged on the main process (``mir(..., accelerator=)``).

Prints the wall times, the speed-ups over 1 and 2, and checks that every run gives the same MIR (1e-10 relative).

Usage:
    python benchmarks/mir_processes.py                     # hidden 512, 8 layers, 64 probe pairs, 2 processes
    python benchmarks/mir_processes.py --quick             # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DDP_CPU = Path(__file__).resolve().parents[1] / "hf_normalign" / "recipes" / "accelerate" / "ddp_cpu.yaml"


def _save_model(folder: Path, hidden: int, layers: int) -> None:
    from hf_normalign.testing import tiny_model, tiny_processor

    heads = max(1, hidden // 64)
    sizes = {"intermediate_size": 4 * hidden, "num_attention_heads": heads, "num_key_value_heads": heads}
    tiny_model("llava", hidden_size=hidden, num_hidden_layers=layers, **sizes).save_pretrained(folder)
    tiny_processor("llava").save_pretrained(folder)


def _run(name: str, launcher: list[str], threads: int, model: Path, options: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*launcher, "-m", "hf_normalign", "mir", str(model), *options, "--json", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}: {done.stderr.strip().splitlines()[-1]}")
    wall = time.perf_counter() - start
    mir = json.loads(out.read_text())["mir"]
    print(f"  {name:<34} {wall:8.1f} s   MIR {mir:.12g}")
    return {"name": name, "wall_s": wall, "mir": mir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="hidden 128, 2 layers, 8 pairs")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.samples = 128, 2, 8
    options = ["--device", "cpu", "--num-samples", str(args.samples), "--batch-size", str(args.batch_size)]
    options.append("--no-progress")
    python = [sys.executable]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU)]
    launch += ["--num_processes", str(args.procs)]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        _save_model(model, args.hidden, args.layers)
        print(f"MIR of a LLaVA-shaped model, D={args.hidden}, {args.layers} layers, {args.samples} probe pairs")
        runs = [
            _run("1 process, 1 thread", python, 1, model, options, Path(tmp) / "a.json"),
            _run(f"1 process, {args.procs} threads", python, args.procs, model, options, Path(tmp) / "b.json"),
            _run(f"{args.procs} processes, 1 thread each", launch, 1, model, options, Path(tmp) / "c.json"),
        ]
    one, threaded, split = runs
    print(f"  speed-up of {args.procs} processes: {one['wall_s'] / split['wall_s']:.2f}x over 1 thread, "
          f"{threaded['wall_s'] / split['wall_s']:.2f}x over {args.procs} threads")  # fmt: skip
    worst = max(abs(r["mir"] - one["mir"]) / abs(one["mir"]) for r in runs)
    print(f"  largest relative MIR difference: {worst:.1e}")
    if worst > 1e-10:
        raise SystemExit("the runs disagree on MIR")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": None}, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
