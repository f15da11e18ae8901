"""Generation throughput of an aligned checkpoint vs its base in vLLM (tokens/s, ratio; target >= 0.97).

Run with the vLLM environment (bash scripts/make_vllm_env.sh); CPU here, CUDA where vLLM's CUDA build is installed:

    .vllm-venv/bin/python benchmarks/vllm_throughput.py            # --quick for a smoke run

Both folders hold the same weights (LLaVA-shaped, random, LLM width ``--hidden``); the aligned one adds the
projector LayerNorm and MoCa on every layer. Each is served by the transformers backend in its own process (the
plugin is installed in both; it does nothing for the base folder). Side by side: both engines are started first,
then timed rounds alternate between them (ABBA order), so both see the same machine load. A round is one batch
of image requests generating a fixed number of tokens each (EOS ignored); the first round of each is a warm-up.
Reported: median tokens/s of each, and the median of the per-round-pair ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from normalign_vllm.testing import prompts, save_tiny_aligned, tiny_images

ENGINE = {"dtype": "float32", "max_model_len": 512, "seed": 0, "model_impl": "transformers"}
RATE = "RATE "  # marks the child's answers among vLLM's log lines


def model_shape(hidden: int) -> dict[str, int]:
    """A Llama-shaped LLM of width ``hidden`` (head_dim 64, MLP 2.75x), 4 layers."""
    return {
        "hidden_size": hidden,
        "head_dim": 64,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "intermediate_size": int(hidden * 2.75),
        "num_hidden_layers": 4,
    }


def _child(folder: str, requests: int, tokens: int, eager: bool) -> None:
    """Start one engine, then time one round per line read from stdin."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, enforce_eager=eager, max_num_seqs=requests, **ENGINE)
    texts = prompts()
    batch = [
        {"prompt": texts[i % len(texts)], "multi_modal_data": {"image": image}}
        for i, image in enumerate(tiny_images(requests))
    ]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    print(RATE + "null", flush=True)  # ready
    for _ in sys.stdin:
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        print(RATE + json.dumps(sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed), flush=True)


class Engine:
    """One checkpoint served in a child process; :meth:`round` times one batch."""

    def __init__(self, folder: str, args: argparse.Namespace):
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
        command = [sys.executable, __file__, "--child", folder, "--requests", str(args.requests)]
        command += ["--tokens", str(args.tokens), *(["--eager"] if args.eager else [])]
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._answer()

    def _answer(self) -> float | None:
        for line in self.proc.stdout:
            if line.startswith(RATE):
                return json.loads(line[len(RATE) :])
        raise RuntimeError(f"the vLLM child exited ({self.proc.wait()}); its stderr is above")

    def round(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="LLM width (head_dim 64, 4 layers)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per checkpoint")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (enforce_eager)")
    parser.add_argument("--quick", action="store_true", help="2 requests x 8 tokens, 1 round, width 256")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.tokens, args.rounds, args.hidden = 2, 8, 1, 256
    if args.child:
        _child(args.child, args.requests, args.tokens, args.eager)
        return
    aligned, base = save_tiny_aligned(tempfile.mkdtemp(prefix="normalign-bench-"), **model_shape(args.hidden))
    engines = {"base": Engine(base, args), "aligned": Engine(aligned, args)}
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.rounds + 1):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))  # ABBA: neither always goes first
        for name in order:
            rates[name].append(engines[name].round())
    for engine in engines.values():
        engine.close()
    timed = {name: values[1:] for name, values in rates.items()}  # round 0 warms up
    ratios = [a / b for a, b in zip(timed["aligned"], timed["base"], strict=True)]
    print(f"LLM width {args.hidden}, {args.requests} requests x {args.tokens} tokens, {args.rounds} rounds")
    print("| checkpoint | tokens/s (median) | rounds |\n|---|---|---|")
    for name, values in timed.items():
        print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.0f}' for v in values)} |")
    print(f"ratio aligned/base: median of rounds {statistics.median(ratios):.3f}, per round ", end="")
    print(", ".join(f"{r:.3f}" for r in ratios), "(target >= 0.97)")


if __name__ == "__main__":
    main()
