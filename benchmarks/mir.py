"""Benchmark MIR end to end: the maths, the capture engine and the streaming mode's memory.

Four measurements, each a single run:

1. the trace term tr((S_x S_y)^(1/2)) from given D x D covariances: ours vs ``scipy.linalg.sqrtm`` of
   the product (target: >= 10x faster, same value to 1e-6);
2. one layer's whole FID from ``--tokens`` float32 features per modality, covariances included:
   ours vs ``np.cov`` + ``sqrtm`` (target: >= 4x). 1 and 2 reuse ``benchmarks/mir_math.py``;
3. capture throughput on one model: our batched :func:`capture` vs a batch-1 ``generate`` loop
   (``max_new_tokens=1, output_hidden_states=True``, the reference script's way), both collecting
   the same vision and passage rows of every layer on the host (target: >= 3x);
4. peak memory of ``mir()`` at two sample counts, each in a fresh process: streaming ("none",
   "drop") should stay flat; the stored-features path ("replace_median") is shown for contrast.
   Peak RSS above the process's RSS just before the call (Linux), plus peak CUDA memory on a GPU.

Usage:
    python benchmarks/mir.py --quick                 # D=512, 5000 tokens, small model (~1 min, 2 cores)
    python benchmarks/mir.py                         # D=4096, 20000 tokens (the 7B-size maths)
    python benchmarks/mir.py --json mir-bench.json   # also write every number as JSON
    python benchmarks/mir.py --only capture,memory --device cuda

The models are tiny-family LLaVA configs built offline (``hf_normalign.testing``) with a wider
LLM: ``--hidden`` and ``--layers`` set its size, the probe is the built-in one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mir_math import naive_fid, random_features, random_spd, scipy_trace_sqrt, timed

from hf_normalign.diagnostics.engine import capture
from hf_normalign.diagnostics.maths.frechet import frechet_distance, trace_sqrt_product
from hf_normalign.diagnostics.metrics.mir import mir
from hf_normalign.diagnostics.probes import default_probe, encode_probe
from hf_normalign.model_view import ModelView
from hf_normalign.testing import tiny_model, tiny_processor


def compare(title: str, ours: tuple[float, float, float], base: tuple[float, float, float]) -> dict[str, float]:
    """Print and return (value, wall, CPU) of ours vs the baseline."""
    rel = abs(ours[0] - base[0]) / abs(base[0])
    print(f"\n{title}")
    print(f"  ours      {ours[1]:9.3f} s wall {ours[2]:9.3f} s CPU   value {ours[0]:.12g}")
    print(f"  baseline  {base[1]:9.3f} s wall {base[2]:9.3f} s CPU   value {base[0]:.12g}")
    print(f"  speed-up {base[1] / ours[1]:.1f}x wall, {base[2] / ours[2]:.1f}x CPU; relative difference {rel:.1e}")
    return {
        "ours_s": ours[1],
        "baseline_s": base[1],
        "speedup": base[1] / ours[1],
        "ours_value": ours[0],
        "baseline_value": base[0],
        "rel_diff": rel,
    }


def bench_maths(dim: int, tokens: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    warm_x, warm_y = random_features(rng, 100, 16, 0.0), random_features(rng, 100, 16, 0.1)
    frechet_distance(warm_x, warm_y)  # library / thread-pool start-up is not what is measured
    naive_fid(warm_x, warm_y)
    sx, sy = random_spd(rng, dim), random_spd(rng, dim)
    trace = compare(
        f"1) trace term tr((S_x S_y)^1/2), D={dim}: symmetric factorisation vs scipy sqrtm(S_x @ S_y)",
        timed(lambda: trace_sqrt_product(sx, sy), 1),
        timed(lambda: scipy_trace_sqrt(sx, sy), 1),
    )
    x, y = random_features(rng, tokens, dim, 0.0), random_features(rng, tokens, dim, 0.1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    fid = compare(
        f"2) one layer's FID from {tokens} x {dim} float32 features per modality: ours vs np.cov + sqrtm",
        timed(lambda: frechet_distance(xt, yt), 1),
        timed(lambda: naive_fid(x, y), 1),
    )
    return {"dim": dim, "tokens": tokens, "trace_term": trace, "fid_from_features": fid}


def _model(hidden: int, layers: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    heads = max(1, hidden // 64)
    model = tiny_model(
        "llava",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=4 * hidden,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    return model.to(device=device, dtype=dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_capture(hidden: int, layers: int, samples: int, batch_size: int, device: str, dtype: torch.dtype) -> dict:
    model, proc = _model(hidden, layers, device, dtype), tiny_processor("llava")
    encoded = encode_probe(proc, default_probe(samples))
    vision_ids = torch.tensor(ModelView.of(model).vision_token_ids)

    def reference_loop() -> int:
        rows = 0
        for s in encoded:
            inputs = {k: v.to(device) for k, v in s.inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.inference_mode():
                out = model.generate(
                    **inputs, max_new_tokens=1, do_sample=False, output_hidden_states=True, return_dict_in_generate=True
                )
            hidden_states = out.hidden_states[0]  # the prefill step: embeddings + every layer
            vis = torch.isin(s.input_ids, vision_ids)
            for layer in range(1, layers + 1):
                h = hidden_states[layer][0].float().cpu()
                rows += h[vis].shape[0] + h[s.text_mask].shape[0]
        return rows

    def batched() -> int:
        rows = 0
        # as run_probe runs it: batches of similar length (less padding)
        batches = capture(
            model, proc, encoded, batch_size=batch_size, output_device="cpu", progress=False, bucket_by_length=True
        )
        for b in batches:
            rows += sum(b.vision[k].shape[0] + b.text[k].shape[0] for k in b.layers)
        return rows

    reference_loop(), batched()  # warm-up (kernels, allocator)
    timings, cpu, rows = {}, {}, {}
    for name, fn in (("generate_batch1", reference_loop), ("capture_batched", batched)):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        rows[name] = fn()
        _sync(device)
        timings[name], cpu[name] = time.perf_counter() - start, time.process_time() - start_cpu
    assert rows["generate_batch1"] == rows["capture_batched"], "both paths must collect the same rows"
    tokens = int(encoded[0].input_ids.shape[0])
    print(
        f"\n3) capture throughput, LLaVA-style LLM hidden {hidden} x {layers} layers, {samples} samples of ~{tokens} "
        f"tokens, {device} {str(dtype).removeprefix('torch.')}, batch {batch_size}"
    )
    for name, seconds in timings.items():
        print(f"  {name:<16} {seconds:8.3f} s wall {cpu[name]:8.3f} s CPU   {samples / seconds:8.2f} samples/s")
    speedup = timings["generate_batch1"] / timings["capture_batched"]
    speedup_cpu = cpu["generate_batch1"] / cpu["capture_batched"]
    print(f"  speed-up {speedup:.1f}x wall, {speedup_cpu:.1f}x CPU")
    return {"hidden": hidden, "layers": layers, "samples": samples, "batch_size": batch_size, "wall_s": timings,
            "cpu_s": cpu, "speedup": speedup, "speedup_cpu": speedup_cpu}  # fmt: skip


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one ``mir()`` in this (fresh) process and report its peak memory above the starting point.

    The peak is the kernel's RSS high-water mark (VmHWM), reset just before the call through
    /proc/self/clear_refs; ``getrusage`` would not do, its maximum survives fork + exec from the parent.
    """
    torch.manual_seed(0)
    model = _model(spec["hidden"], spec["layers"], spec["device"], getattr(torch, spec["dtype"]))
    proc = tiny_processor("llava")
    kwargs = {"outliers": spec["outliers"], "batch_size": 8, "progress": False}
    mir(model, proc, num_samples=2, **kwargs)  # warm-up on 2 samples
    cuda = spec["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before_cuda = torch.cuda.memory_allocated() if cuda else 0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    before = _status_bytes("VmRSS")
    result = mir(model, proc, num_samples=spec["samples"], **kwargs)
    peak = _status_bytes("VmHWM")
    return {
        "peak_rss_above_start_mb": max(0, peak - before) / 2**20,
        "peak_cuda_above_start_mb": (torch.cuda.max_memory_allocated() - before_cuda) / 2**20 if cuda else None,
        "mir": result.mir,
        "streaming": result.settings["streaming"],
        "tokens": result.num_vision_tokens[0] + result.num_text_tokens[0],
    }


def bench_memory(hidden: int, layers: int, counts: list[int], device: str, dtype: str) -> dict[str, Any]:
    print(f"\n4) peak memory of mir(), LLM hidden {hidden} x {layers} layers, fresh process per run ({device})")
    out: dict[str, Any] = {"hidden": hidden, "layers": layers, "runs": []}
    for outliers in ("none", "drop", "replace_median"):
        for n in counts:
            spec = {"hidden": hidden, "layers": layers, "device": device, "dtype": dtype, "outliers": outliers,
                    "samples": n}  # fmt: skip
            # A fixed glibc mmap threshold returns freed tensors to the OS at once; with the default dynamic
            # threshold, heap fragmentation makes RSS creep with the number of batches, whatever the algorithm.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
            done = subprocess.run(
                [sys.executable, __file__, "--memory-child", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            res = {**spec, **json.loads(done.stdout.strip().splitlines()[-1])}
            out["runs"].append(res)
            cuda = f", CUDA +{res['peak_cuda_above_start_mb']:.0f} MB" if res["peak_cuda_above_start_mb"] else ""
            print(
                f"  outliers={outliers:<15} streaming={res['streaming']!s:<5} N={n:>4} "
                f"({res['tokens']:>6} tokens/layer): peak RSS +{res['peak_rss_above_start_mb']:7.1f} MB{cuda}"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast check")
    parser.add_argument("--dim", type=int, help="D for 1 and 2 (default 4096; 512 with --quick)")
    parser.add_argument("--tokens", type=int, help="rows per modality for 2 (default 20000; 5000 with --quick)")
    parser.add_argument("--hidden", type=int, help="LLM hidden size for 3 and 4 (default 1024; 256 with --quick)")
    parser.add_argument("--layers", type=int, default=4, help="LLM decoder layers for 3 and 4")
    parser.add_argument("--samples", type=int, default=32, help="probe samples for 3")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--counts", default="25,100", help="sample counts for 4 (at most 100)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--only", default="maths,capture,memory", help="comma list of maths, capture, memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write all numbers here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    dim = args.dim or (512 if args.quick else 4096)
    tokens = args.tokens or (5000 if args.quick else 20000)
    hidden = args.hidden or (256 if args.quick else 1024)
    only = set(args.only.split(","))
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, device {args.device}"
    )
    record: dict[str, Any] = {"device": args.device, "cpus": os.cpu_count(), "torch": torch.__version__}
    if "maths" in only:
        record["maths"] = bench_maths(dim, tokens, args.seed)
    if "capture" in only:
        dtype = getattr(torch, args.dtype)
        record["capture"] = bench_capture(hidden, args.layers, args.samples, args.batch_size, args.device, dtype)
    if "memory" in only:
        counts = [int(c) for c in args.counts.split(",")]
        record["memory"] = bench_memory(hidden, args.layers, counts, args.device, args.dtype)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
