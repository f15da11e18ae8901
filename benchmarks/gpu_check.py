"""One GPU check: the gpu-marked tests, bf16 / 4-bit / 8-bit training steps patched vs unpatched, and the MIR of a
7B-shaped random model, written to one JSON file. Needs a CUDA device (exits with status 2 without one); about
5-8 minutes on one H100/H200-class GPU.

    python benchmarks/gpu_check.py                      # writes gpu_check.json
    python benchmarks/gpu_check.py --json out.json --skip-tests

Parts (each recorded under its own key, with its error if it failed, so one failure does not hide the others):
1. ``tests``: ``pytest -m gpu`` (exit status and the summary line).
2. ``bf16_step``: a LLaVA-shaped model (LLM D=4096, 4 layers, 576 vision tokens, batch 2) in bf16, forward +
   backward + SGD step, all three methods vs unpatched taking turns: median step time ratio and peak CUDA
   memory ratio.
3. ``kbit_step``: the same model with the LLM in 4-bit (nf4) and 8-bit (bitsandbytes), projector + plugin trained.
4. ``mir_7b``: MIR of a 7B-shaped random LLaVA (32 decoder layers at D=4096: 33 layers of capture with the
   embeddings) on the built-in 100-pair probe: wall time, peak host RSS, peak CUDA memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_CUDA = "gpu_check needs a CUDA device (torch.cuda.is_available() is False); nothing was run."


def run_tests() -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    return {"exit_status": done.returncode, "summary": summary, "wall_s": time.perf_counter() - start}


def _timed_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Seconds and peak CUDA bytes of one forward + backward + SGD step."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated()


def compare_steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int = 5) -> dict[str, Any]:
    """Unpatched vs all three methods on the same weights, in turns (round 0 warms up)."""
    import hf_normalign as normalign

    times: dict[str, list[float]] = {"unpatched": [], "patched": []}
    peaks: dict[str, int] = {}
    for repeat in range(repeats + 1):
        for name in times:
            if name == "patched":
                normalign.patch(model, methods=["projector_norm", "moca", "pre"])
                normalign.patching.get_plugin(model).requires_grad_(True)
            seconds, peak = _timed_step(model, batch)
            if repeat:
                times[name].append(seconds)
                peaks[name] = max(peaks.get(name, 0), peak)
            if name == "patched":
                normalign.unpatch(model)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "median_step_s": median,
        "peak_cuda_bytes": peaks,
        "time_ratio": median["patched"] / median["unpatched"],
        "memory_ratio": peaks["patched"] / peaks["unpatched"],
    }


def bf16_step() -> dict[str, Any]:
    from overhead import batch_for, build

    with torch.device("cuda"):
        model = build(4096, 4, 336).to(torch.bfloat16)
    batch = {k: v.cuda() for k, v in batch_for(model.config, batch_size=2, text_tokens=64).items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    return compare_steps(model, batch)


def kbit_step(bits: int, directory: str) -> dict[str, Any]:
    from overhead import batch_for, build
    from transformers import AutoModelForImageTextToText

    import hf_normalign as normalign

    if not os.path.isdir(directory):
        build(4096, 4, 336).to(torch.bfloat16).save_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(
        directory, quantization_config=normalign.bnb_config(bits, directory), dtype=torch.bfloat16, device_map="cuda"
    )
    model = normalign.prepare_for_kbit_training(model)
    model.model.multi_modal_projector.requires_grad_(True)
    batch = {k: v.cuda() for k, v in batch_for(model.config, batch_size=2, text_tokens=64).items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    return compare_steps(model, batch, repeats=3)


def mir_7b() -> dict[str, Any]:
    from hf_normalign.diagnostics import mir
    from hf_normalign.testing import tiny_model, tiny_processor

    with torch.device("cuda"):
        model = tiny_model(
            "llava",
            hidden_size=4096,
            num_hidden_layers=32,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
        ).to(torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = mir(model, tiny_processor("llava"), num_samples=100, batch_size=8, include_embeddings=True, progress=False)
    wall = time.perf_counter() - start
    return {
        "layers_captured": len(result.layers),
        "num_samples": result.num_samples,
        "mir": result.mir,
        "wall_s": wall,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(),
    }


def _part(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    start = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as err:  # record and go on: one broken part must not hide the others' figures
        report[name] = {"error": f"{type(err).__name__}: {err}"}
    report[name]["part_wall_s"] = time.perf_counter() - start
    print(name, json.dumps(report[name], default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_check.json", help="output file (default gpu_check.json)")
    parser.add_argument("--skip-tests", action="store_true", help="skip pytest -m gpu")
    parser.add_argument("--workdir", default="/tmp/hf_normalign_gpu_check", help="for the saved k-bit model")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # overhead.py's model and batch builders
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    start = time.perf_counter()
    if not args.skip_tests:
        _part(report, "tests", run_tests)
    _part(report, "bf16_step", bf16_step)
    for bits in (4, 8):
        _part(report, f"kbit{bits}_step", lambda bits=bits: kbit_step(bits, os.path.join(args.workdir, "llava_d4096")))
    _part(report, "mir_7b", mir_7b)
    report["total_wall_s"] = time.perf_counter() - start
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
