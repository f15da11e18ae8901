"""Benchmark the MIR maths: our Fréchet distance vs the textbook numpy/scipy route.

Two measurements at hidden size D:

1. the trace term tr((S_x S_y)^(1/2)) for given random SPD covariances: ours (symmetric
   factorisation, :func:`trace_sqrt_product`) vs ``scipy.linalg.sqrtm(S_x @ S_y)``;
2. one layer's whole FID from features (``--tokens`` rows per modality, float32 like hidden states),
   covariances included: :func:`frechet_distance` vs ``np.cov`` + ``scipy.linalg.sqrtm``.

Each prints both timings, their ratio and the relative difference of the values.

Usage:
    python benchmarks/mir_math.py                         # D=1024, 20000 tokens (quick)
    python benchmarks/mir_math.py --dim 4096              # the size of a 7B LLM (minutes on 2 cores)
    python benchmarks/mir_math.py --dim 1024 --newton-schulz
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import numpy as np
import scipy
import scipy.linalg
import torch

from hf_normalign.diagnostics.maths.frechet import frechet_distance, trace_sqrt_product


def timed(fn: Callable[[], float], repeat: int) -> tuple[float, float, float]:
    """(value, wall s, process CPU s) of the fastest of ``repeat`` runs.

    The first run of a large size also pays for fresh memory pages; the best run is the least
    disturbed by that and by other load. CPU time (all threads) is shown for shared machines.
    """
    best = (math.inf, math.inf)
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return value, *best


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A dense SPD covariance with a decaying spectrum, loosely like hidden-state covariances."""
    g = rng.standard_normal((dim, dim)) * (1.0 / np.sqrt(1 + np.arange(dim)))
    return g @ g.T / dim + 1e-3 * np.eye(dim)


def random_features(rng: np.random.Generator, tokens: int, dim: int, shift: float) -> np.ndarray:
    """float32 features: a 64-dimensional shared structure plus per-dimension noise and an offset."""
    low_rank = rng.standard_normal((tokens, 64), dtype=np.float32) @ rng.standard_normal((64, dim), dtype=np.float32)
    noise = rng.standard_normal((tokens, dim), dtype=np.float32) * rng.uniform(0.2, 2.0, dim).astype(np.float32)
    return 0.3 * low_rank + noise + np.float32(shift)


def scipy_trace_sqrt(sx: np.ndarray, sy: np.ndarray) -> float:
    return float(np.trace(scipy.linalg.sqrtm(sx @ sy)).real)


def naive_fid(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + np.trace(sx) + np.trace(sy) - 2 * scipy_trace_sqrt(sx, sy))


def report(title: str, rows: list[tuple[str, float, float, float]]) -> None:
    """rows: (label, value, wall s, CPU s); the first row is ours, the last the baseline."""
    print(f"\n{title}")
    base_value, base_wall, base_cpu = rows[-1][1:]
    for label, value, wall, cpu in rows:
        rel = abs(value - base_value) / abs(base_value)
        print(f"  {label:<24} {wall:8.2f} s wall {cpu:8.2f} s CPU   value {value:.10g}   rel. diff {rel:.1e}")
    print(f"  speed-up (baseline / ours): {base_wall / rows[0][2]:.1f}x wall, {base_cpu / rows[0][3]:.1f}x CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024, help="hidden size D (4096 for a 7B LLM)")
    parser.add_argument("--tokens", type=int, default=20000, help="feature rows per modality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best time is shown")
    parser.add_argument("--newton-schulz", action="store_true", help="also time sqrt='newton_schulz' (slow on CPU)")
    args = parser.parse_args()

    print(
        f"D={args.dim}, tokens={args.tokens}, best of {args.repeat}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"scipy {scipy.__version__}, {os.cpu_count()} CPUs"
    )
    rng = np.random.default_rng(args.seed)
    # One-time library initialisation (LAPACK / thread pools) is not what we measure.
    small_x, small_y = random_features(rng, 100, 16, 0.0), random_features(rng, 100, 16, 0.1)
    frechet_distance(small_x, small_y)
    naive_fid(small_x, small_y)

    sx, sy = random_spd(rng, args.dim), random_spd(rng, args.dim)
    rows = [("ours exact", *timed(lambda: trace_sqrt_product(sx, sy), args.repeat))]
    if args.newton_schulz:
        rows.append(
            (
                "ours newton_schulz",
                *timed(lambda: trace_sqrt_product(sx, sy, method="newton_schulz"), args.repeat),
            )
        )
    rows.append(("scipy sqrtm(S_x @ S_y)", *timed(lambda: scipy_trace_sqrt(sx, sy), args.repeat)))
    report("1) trace term tr((S_x S_y)^1/2) from given covariances", rows)

    x = random_features(rng, args.tokens, args.dim, 0.0)
    y = random_features(rng, args.tokens, args.dim, 0.1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    rows = [("ours frechet_distance", *timed(lambda: frechet_distance(xt, yt), args.repeat))]
    if args.newton_schulz:
        rows.append(
            (
                "ours newton_schulz",
                *timed(lambda: frechet_distance(xt, yt, sqrt="newton_schulz"), args.repeat),
            )
        )
    rows.append(("np.cov + scipy sqrtm", *timed(lambda: naive_fid(x, y), args.repeat)))
    report(f"2) one layer's FID from {args.tokens} x {args.dim} float32 features per modality", rows)


if __name__ == "__main__":
    main()
