"""The report's metrics, the old way (one public call per metric, a probe pass each) vs the one-pass way
(``run_metrics``: profile + MIR + key-space share one pass; degradation has its own labelled probe), side by side.

Both ways run the same four metrics with the report's settings on the same model; variants take turns
(round-robin) so drift in machine speed hits both alike, and the figure is the median of ``--repeats``. Forwards
(top-level model calls) are counted with a hook, and the two ways' results are checked to be equal.

    python benchmarks/report_passes.py              # the recorded configuration
    python benchmarks/report_passes.py --quick      # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from hf_normalign.diagnostics import (
    KeySpaceOptions,
    RunOptions,
    degradation_run,
    key_space_gap,
    key_space_run,
    mir,
    mir_run,
    modality_profile,
    profile_run,
    run_metrics,
    visual_degradation,
)
from hf_normalign.diagnostics.probes import prepare_probe
from hf_normalign.testing import tiny_model, tiny_processor


def separate(model: Any, processor: Any, n: int, deg: int, batch: int) -> dict[str, Any]:
    """What build_report did before the one-pass change: one call per metric."""
    common = {"batch_size": batch, "seed": 0, "progress": False}
    return {
        "profile": modality_profile(model, processor, num_samples=n, **common),
        "mir": mir(model, processor, num_samples=n, **common),
        "key_space": key_space_gap(model, processor, num_samples=n, max_samples=2000, **common),
        "degradation": visual_degradation(model, processor, num_samples=deg, **common),
    }


def one_pass(model: Any, processor: Any, n: int, deg: int, batch: int) -> dict[str, Any]:
    """What build_report does now: the metrics prepared over one encoding of the probe, run together."""
    run = RunOptions(batch_size=batch, progress=False)
    data = {"num_samples": n, "seed": 0, "run": run}
    shared = prepare_probe(processor, None, num_samples=n, seed=0, progress=False)
    prepared = [
        profile_run(model, processor, **data, samples=shared),
        mir_run(model, processor, **data, samples=shared),
        key_space_run(model, processor, **data, samples=shared, options=KeySpaceOptions(max_samples=2000)),
        degradation_run(model, processor, num_samples=deg, seed=0, run=run),
    ]
    return run_metrics(model, processor, prepared, run)


def timed(fn: Callable[[], dict[str, Any]], model: torch.nn.Module) -> tuple[float, float, int, dict[str, Any]]:
    count = [0]
    handle = model.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        out = fn()
    finally:
        handle.remove()
    return time.perf_counter() - wall, time.process_time() - cpu, count[0], out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model and probe, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=48, help="probe pairs of profile / MIR / key-space")
    parser.add_argument("--degradation-samples", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.samples, args.degradation_samples = 1, 8, 12
        sizes = {}
    else:  # LLaVA-shaped but small: a real decoder's share of the work, CPU-sized
        sizes = {"num_hidden_layers": 8, "hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 8,
                 "num_key_value_heads": 8}  # fmt: skip
    torch.set_num_threads(2)
    model, processor = tiny_model("llava", **sizes), tiny_processor("llava")
    ways = {"separate calls (before)": separate, "one pass (now)": one_pass}
    times: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
    forwards, results = {}, {}
    for _ in range(args.repeats):
        for name, way in ways.items():
            wall, cpu, count, out = timed(
                lambda way=way: way(model, processor, args.samples, args.degradation_samples, args.batch_size), model
            )
            times[name].append((wall, cpu))
            forwards[name], results[name] = count, out
    before, now = (results[w] for w in ways)
    equal = all(before[m].to_dict() == now[m].to_dict() for m in before)
    print(f"llava {sizes or 'tiny'}, {args.samples} + {args.degradation_samples} pairs, batch {args.batch_size}, "
          f"median of {args.repeats}; results equal: {equal}")  # fmt: skip
    base = None
    print(f"{'way':<26}{'forwards':>9}{'wall s':>9}{'CPU s':>9}{'wall ratio':>12}{'CPU ratio':>11}")
    for name in ways:
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        base = base or (wall, cpu)
        print(f"{name:<26}{forwards[name]:>9}{wall:>9.2f}{cpu:>9.2f}{wall / base[0]:>12.3f}{cpu / base[1]:>11.3f}")


if __name__ == "__main__":
    main()
