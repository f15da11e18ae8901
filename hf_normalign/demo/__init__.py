"""``normalign demo``: the papers' stage-1 experiment in miniature, offline, on a laptop CPU.

A synthetic captioning task (:mod:`.data`), a real LLaVA with a loud vision tower and a text-pre-trained
LLM (:mod:`.models`), stage-1 alignment of six variants with the same seed and budget, and the held-out
results (mean ± std over seeds), diagnostics and a checkpoint round trip (:mod:`.experiment`), written to a
report (:mod:`.report`).

Command line::

    normalign demo --quick              # under 3 minutes on 2 CPU cores
    normalign demo --out my-demo        # the full run: 3 seeds, mean ± std
    normalign demo --quick --seeds 3    # quick, with a spread over 3 seeds
    python -m hf_normalign demo --seed 1 --steps 400

Python::

    from hf_normalign.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig.quick(seed=1), "my-demo")
    print(result.table)
    result.results["variants"]["all three"]["mir"]
"""

from __future__ import annotations

import argparse
import time

from .experiment import VARIANTS, DemoConfig, DemoResult, run_demo

__all__ = ["VARIANTS", "DemoConfig", "DemoResult", "register", "run_demo"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand to the ``normalign`` parser."""
    parser = subparsers.add_parser(
        "demo",
        help="run the miniature alignment experiment offline",
        description=(
            "Stage-1 alignment of baseline, projector_norm (with and without GWC), moca, pre and all three on a "
            "synthetic captioning task, offline on CPU. Writes report.html, results.json, diagnostics/ and "
            "checkpoint/ to --out and prints the results table."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="the small run (under 3 minutes on 2 CPU cores)")
    parser.add_argument("--out", default="normalign-demo", help="output folder (default: ./normalign-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, models, batches (default 0)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="whole runs with seeds seed, seed+1, ... (default: 3, --quick: 1)"
    )
    parser.add_argument("--steps", type=int, default=None, help="stage-1 steps per variant (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: fastest here)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    overrides = {"seed": args.seed} | {k: v for k, v in (("steps", args.steps), ("seeds", args.seeds)) if v is not None}
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig.full(**overrides)
    start = time.perf_counter()
    result = run_demo(config, args.out, num_threads=args.threads, progress=not args.no_progress)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    return 0 if result.checkpoint_equal else 1
