"""``normalign demo`` (options in :mod:`hf_normalign.cli`): the miniature stage-1 experiment of
:mod:`hf_normalign.demo`, with its table on stdout."""

from __future__ import annotations

import argparse
import time

from ..console import emit
from ..demo import DemoConfig, run_demo


def run(args: argparse.Namespace) -> int:
    """Run the demo into ``args.out``; exit 1 when the checkpoint round trip was not exact."""
    overrides = {"seed": args.seed} | {k: v for k, v in (("steps", args.steps), ("seeds", args.seeds)) if v is not None}
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig.full(**overrides)
    start = time.perf_counter()
    result = run_demo(config, args.out, num_threads=args.threads, progress=not args.no_progress, log=emit)
    emit(f"\nwall time {time.perf_counter() - start:.0f} s")
    return 0 if result.checkpoint_equal else 1
