"""Train-step time and activation memory of each method, patched vs unpatched, side by side.

A LLaVA-shaped model (LLM D=1024, 8 layers, 576 vision tokens, batch 2; small vision tower, since
its cost is the same in every variant) runs forward + backward + SGD step. Variants take turns
(round-robin) on the same weights so drift in machine speed hits all of them alike; the figure is
the median step time divided by the unpatched median.

Memory: bytes of the tensors autograd saves for backward (deduplicated by storage), which is what
grows with a method's activations; weights and gradients are listed separately.

`--compile` adds two rows: the same train step with the model under `torch.compile(fullgraph=True)`,
unpatched and with all three methods (two copies of the same weights, each compiled once, taking turns).
Times are CPU seconds of this process (`time.process_time`), robust on a shared machine; `--wall` uses
wall-clock time instead.

    python benchmarks/overhead.py --compile  # the recorded configuration
    python benchmarks/overhead.py --quick    # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

import hf_normalign as normalign

VARIANTS: dict[str, list[str]] = {
    "unpatched": [],
    "projector_norm": ["projector_norm"],
    "moca": ["moca"],
    "pre": ["pre"],
    "all three": ["projector_norm", "moca", "pre"],
}


def build(hidden: int, layers: int, image_size: int) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llava",
        text_config={
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4,
            "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64,
            "vocab_size": 32000,
        },
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 14,
        },
        image_token_id=31999,
    )
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).train()


def batch_for(config, batch_size: int, text_tokens: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    vision = config.vision_config
    n_vision = (vision.image_size // vision.patch_size) ** 2
    ids = torch.randint(1, 31000, (batch_size, text_tokens + n_vision), generator=gen)
    ids[:, 8 : 8 + n_vision] = config.image_token_id
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=gen)
    return {"input_ids": ids, "pixel_values": pixels, "labels": labels}


def saved_activation_bytes(model, batch) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def step(model, batch, optimizer, clock: Callable[[], float]) -> float:
    start = clock()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return clock() - start


def compiled_rows(model, batch, repeats: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    """Median step times of the compiled unpatched and all-three models (warm-up steps compile)."""
    patched = normalign.patch(copy.deepcopy(model), methods=VARIANTS["all three"])
    runs = {
        "unpatched (compiled)": torch.compile(model, fullgraph=True),
        "all three (compiled)": torch.compile(patched, fullgraph=True),
    }
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-9) for name, m in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats + 2):  # two warm-up rounds: compile, then the first cached run
        for name, compiled in runs.items():
            elapsed = step(compiled, batch, optimizers[name], clock)
            if repeat >= 2:
                times[name].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D=256, 2 layers, 144 vision tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True) steps")
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of process CPU time")
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.process_time
    hidden, layers, image_size = (256, 2, 168) if args.quick else (1024, 8, 336)
    model = build(hidden, layers, image_size)
    batch = batch_for(model.config, batch_size=2, text_tokens=64)
    print(
        f"LLaVA-shaped: D={hidden}, {layers} layers, {batch['input_ids'].shape[1]} tokens "
        f"({(image_size // 14) ** 2} vision), batch 2, threads={torch.get_num_threads()}"
    )

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    memory: dict[str, int] = {}
    for repeat in range(args.repeats + 1):  # round 0 warms up and measures memory
        for name, methods in VARIANTS.items():
            if methods:
                normalign.patch(model, methods=methods)
            # SGD without momentum: no optimizer state, so variants do not differ by it.
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
            if repeat == 0:
                memory[name] = saved_activation_bytes(model, batch)
                step(model, batch, optimizer, clock)
            else:
                times[name].append(step(model, batch, optimizer, clock))
            if methods:
                normalign.unpatch(model)

    base_time = statistics.median(times["unpatched"])
    print(f"{'variant':<22}{'median step s':>14}{'time ratio':>12}{'saved act. MiB':>16}{'memory ratio':>14}")
    for name in VARIANTS:
        median = statistics.median(times[name])
        print(
            f"{name:<22}{median:>14.3f}{median / base_time:>12.3f}"
            f"{memory[name] / 2**20:>16.1f}{memory[name] / memory['unpatched']:>14.3f}"
        )
    if args.compile:
        compiled = compiled_rows(model, batch, args.repeats, clock)
        base = statistics.median(compiled["unpatched (compiled)"])
        for name, values in compiled.items():
            print(f"{name:<22}{statistics.median(values):>14.3f}{statistics.median(values) / base:>12.3f}")


if __name__ == "__main__":
    main()
