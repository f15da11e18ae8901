"""Time the capture engine alone (no ``generate`` baseline), to compare two versions of the library side by side.

Runs :func:`capture` over ``default_probe(32)`` in batches of 8 on a LLaVA-style tiny-family model (LLM of
``HIDDEN`` x 4 layers, CPU float32) and prints wall and CPU seconds per run after one warm-up. Works with the
layout before issue 17b (``diagnostics.capture`` module) and after it (bucketed batches, as the probe runner
runs them). Run each version from its own checkout / venv, alternately:

    python benchmarks/capture_only.py 1024 2
"""

from __future__ import annotations

import inspect
import sys
import time

import torch

from hf_normalign.diagnostics import capture, default_probe
from hf_normalign.testing import tiny_model, tiny_processor

try:
    from hf_normalign.diagnostics.probes import encode_probe
except ImportError:  # the layout before issue 17b
    from hf_normalign.diagnostics.capture import encode_probe


def main() -> None:
    hidden, reps = int(sys.argv[1]), int(sys.argv[2])
    heads = max(1, hidden // 64)
    torch.manual_seed(0)
    model = tiny_model(
        "llava",
        hidden_size=hidden,
        num_hidden_layers=4,
        intermediate_size=4 * hidden,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    processor = tiny_processor("llava")
    encoded = encode_probe(processor, default_probe(32))
    bucketed = "bucket_by_length" in inspect.signature(capture).parameters
    extra = {"bucket_by_length": True} if bucketed else {}

    def run() -> int:
        batches = capture(model, processor, encoded, batch_size=8, output_device="cpu", progress=False, **extra)
        return sum(b.vision[k].shape[0] + b.text[k].shape[0] for b in batches for k in b.layers)

    run()  # warm-up
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        rows = run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{'after' if bucketed else 'before'} hidden {hidden}: {wall:.3f} s wall {cpu:.3f} s CPU, {rows} rows")


if __name__ == "__main__":
    main()
