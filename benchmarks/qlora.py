"""QLoRA train step with all three methods vs the same step unpatched: time and peak-memory ratios.

Both variants load the same LLaVA-shaped checkpoint (LLM D=512, 4 layers, 144 vision tokens, vocab
32000, batch 2, 64 text tokens) in 4-bit nf4 with `hf_normalign.bnb_config` (vision tower, projector
and lm_head unquantised), run `prepare_for_kbit_training` (gradient checkpointing on), add LoRA r=16
on the LLM's attention and MLP Linears, and time forward + backward + AdamW step (medians of wall and
process CPU time; with ``--threads 1`` CPU time is the steadier figure on a shared machine). The
patched variant also trains the plugin (`mark_plugin_trainable`).

Each variant runs in a fresh subprocess, alternating over ``--rounds``, so memory figures do not
mix. Peak memory of one step (after a warm-up step, so optimizer state already exists):

- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the step;
- CPU: peak RSS of the step above RSS before it (``VmHWM`` reset through ``/proc/self/clear_refs``;
  glibc is told to return freed memory so RSS follows live tensors), plus the bytes autograd saves
  for backward, which do not depend on the allocator.

    python benchmarks/qlora.py                 # recorded configuration
    python benchmarks/qlora.py --quick         # D=256, 2 layers, for a smoke run
    python benchmarks/qlora.py --threads 1     # on a loaded machine: compare the CPU-time column
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from transformers import AutoModelForImageTextToText

import hf_normalign as normalign
from hf_normalign.patching import get_plugin
from hf_normalign.peft_utils import mark_plugin_trainable
from hf_normalign.quantization import bnb_config, prepare_for_kbit_training

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import batch_for, build, saved_activation_bytes

VARIANTS = {"unpatched": [], "all three": ["projector_norm", "moca", "pre"]}
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def build_checkpoint(path: str, hidden: int, layers: int) -> None:
    build(hidden, layers, image_size=168).save_pretrained(path)  # (168 / 14)^2 = 144 vision tokens


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(variant: str, checkpoint: str, steps: int, dtype: torch.dtype) -> dict[str, Any]:
    """One variant in this (fresh) process; returns its step times and memory figures."""
    from peft import LoraConfig, get_peft_model

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(
        checkpoint, quantization_config=bnb_config(4, compute_dtype=dtype), dtype=dtype, device_map=device
    )
    if VARIANTS[variant]:
        normalign.patch(model, methods=VARIANTS[variant])
    model = prepare_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(target_modules=LORA_TARGETS, r=16, lora_alpha=32))
    if get_plugin(model) is not None:
        mark_plugin_trainable(model)
    model.train()
    batch = {k: v.to(device) for k, v in batch_for(model.config, batch_size=2, text_tokens=64).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step() -> tuple[float, float]:
        """(wall s, process CPU s) of one training step."""
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    step()  # warm-up: optimizer state, lazy inits
    saved = saved_activation_bytes(model, batch)
    if cuda:
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
        step()
        peak = (rss_kib("VmHWM") - before) * 1024
    times = [step() for _ in range(steps)]
    return {
        "wall": [t[0] for t in times],
        "cpu": [t[1] for t in times],
        "peak": peak,
        "saved": saved,
        "trainable": sum(p.numel() for p in trainable),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D=256, 2 layers")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, alternating")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads per worker (1: CPU time free of spin-waits)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype_name = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        result = worker(args.worker, args.checkpoint, args.steps, getattr(torch, dtype_name))
        print("RESULT " + json.dumps(result))
        return

    hidden, layers = (256, 2) if args.quick else (512, 4)
    # glibc: serve large blocks with mmap and hand freed memory back, so RSS follows live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as checkpoint:
        build_checkpoint(checkpoint, hidden, layers)
        for _ in range(args.rounds):
            for name in VARIANTS:
                command = [sys.executable, __file__, "--worker", name, "--checkpoint", checkpoint]
                command += ["--steps", str(args.steps), "--dtype", dtype_name]
                command += ["--threads", str(args.threads)] if args.threads else []
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
                results[name].append(json.loads(out.split("RESULT ", 1)[1]))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"QLoRA (nf4, {dtype_name}, gradient checkpointing, LoRA r=16 on LLM Linears), LLaVA-shaped D={hidden}, "
        f"{layers} layers, 144 vision + 64 text tokens, batch 2; {device}; "
        f"{args.rounds} processes x {args.steps} steps per variant"
    )

    def summary(runs: list[dict]) -> dict[str, float]:
        return {
            "wall": statistics.median(t for r in runs for t in r["wall"]),
            "cpu": statistics.median(t for r in runs for t in r["cpu"]),
            "peak": statistics.median(r["peak"] for r in runs),
            "saved": runs[0]["saved"],
            "trainable": runs[0]["trainable"],
        }

    base = summary(results["unpatched"])
    print(
        f"{'variant':<12}{'trainable':>11}{'step wall s':>13}{'ratio':>7}{'step CPU s':>12}{'ratio':>7}"
        f"{'peak MiB':>10}{'ratio':>7}{'saved act. MiB':>16}{'ratio':>7}"
    )
    for name, runs in results.items():
        s = summary(runs)
        print(
            f"{name:<12}{s['trainable']:>11,}{s['wall']:>13.3f}{s['wall'] / base['wall']:>7.3f}"
            f"{s['cpu']:>12.3f}{s['cpu'] / base['cpu']:>7.3f}{s['peak'] / 2**20:>10.1f}{s['peak'] / base['peak']:>7.3f}"
            f"{s['saved'] / 2**20:>16.1f}{s['saved'] / base['saved']:>7.3f}"
        )


if __name__ == "__main__":
    main()
