"""Generation throughput of an aligned checkpoint vs its base in vLLM (tokens/s, ratio; target >= 0.97).

Run with the vLLM environment (bash scripts/make_vllm_env.sh); CPU here, CUDA where vLLM's CUDA build is installed:

    .vllm-venv/bin/python benchmarks/vllm_throughput.py            # --quick for a smoke run

Both folders hold the same weights (LLaVA-shaped, random, LLM width ``--hidden``); the aligned one adds the
projector LayerNorm and MoCa on every layer. Each is served by the transformers backend in its own process (the
plugin is installed in both; it does nothing for the base folder), with one compute thread (OMP_NUM_THREADS=1,
VLLM_CPU_OMP_THREADS_BIND=nobind unless set in the environment). Side by side: both engines are started first,
then timed rounds alternate between them (ABBA order), so both see the same machine load; ``--pairs`` such engine
pairs run one after the other, alternating which checkpoint starts first (an A/A check, ``--control``, showed a
few % in favour of the process started second). A round is one batch of image requests generating a fixed number
of tokens each (EOS ignored); the first round of each engine is a warm-up.
Reported for two clocks: process CPU time (all of the engine's threads; the steadier one on a shared machine) and
wall time: per pair, median tokens/s of each checkpoint and the median of the per-round ratios; overall, the
geometric mean of the pairs' ratios.
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
        wall, cpu = time.perf_counter(), time.process_time()
        outputs = llm.generate(batch, params, use_tqdm=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(RATE + json.dumps({"wall": generated / wall, "cpu": generated / cpu}), flush=True)


class Engine:
    """One checkpoint served in a child process; :meth:`round` times one batch."""

    def __init__(self, folder: str, args: argparse.Namespace):
        # One compute thread each (overridable): the idle engine then has no OpenMP workers spinning on the cores
        # the timed one uses, and process CPU time is the work done.
        env = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", **os.environ}
        env |= {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
        command = [sys.executable, __file__, "--child", folder, "--requests", str(args.requests)]
        command += ["--tokens", str(args.tokens), *(["--eager"] if args.eager else [])]
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._answer()

    def _answer(self) -> dict[str, float] | None:
        for line in self.proc.stdout:
            if line.startswith(RATE):
                return json.loads(line[len(RATE) :])
        raise RuntimeError(f"the vLLM child exited ({self.proc.wait()}); its stderr is above")

    def round(self) -> dict[str, float]:
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
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per checkpoint")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (enforce_eager)")
    parser.add_argument("--quick", action="store_true", help="2 requests x 8 tokens, 1 round, 1 pair, width 256")
    parser.add_argument("--pairs", type=int, default=2, help="engine pairs, alternating which starts first")
    parser.add_argument("--control", action="store_true", help="A/A check: serve the base folder as both engines")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.tokens, args.rounds, args.pairs, args.hidden = 2, 8, 1, 1, 256
    if args.child:
        _child(args.child, args.requests, args.tokens, args.eager)
        return
    aligned, base = save_tiny_aligned(tempfile.mkdtemp(prefix="normalign-bench-"), **model_shape(args.hidden))
    folders = {"base": base, "aligned": base if args.control else aligned}
    control = " (CONTROL: base served as both)" if args.control else ""
    print(f"LLM width {args.hidden}, {args.requests} requests x {args.tokens} tokens, {args.rounds} rounds{control}")
    print("| pair | started first | clock | base tokens/s | aligned tokens/s | ratio (median) | ratio per round |")
    print("|---|---|---|---|---|---|---|")
    pair_ratios = {"cpu": [], "wall": []}
    for pair in range(args.pairs):
        # A process started second ran a few % faster in an A/A check: alternate which checkpoint starts first.
        names = ["base", "aligned"] if pair % 2 == 0 else ["aligned", "base"]
        rates = run_pair({name: folders[name] for name in names}, args)
        for clock, ratios in pair_ratios.items():
            timed = {name: [r[clock] for r in values[1:]] for name, values in rates.items()}  # round 0 warms up
            per_round = [a / b for a, b in zip(timed["aligned"], timed["base"], strict=True)]
            ratios.append(statistics.median(per_round))
            medians = " | ".join(f"{statistics.median(timed[name]):.1f}" for name in ("base", "aligned"))
            print(f"| {pair} | {names[0]} | {clock} | {medians} | {ratios[-1]:.3f} |", end=" ")
            print(", ".join(f"{r:.2f}" for r in per_round), "|", flush=True)
    for clock, ratios in pair_ratios.items():
        mean = statistics.geometric_mean(ratios)
        print(f"ratio aligned/base ({clock} clock), geometric mean of the pairs: {mean:.3f}")
    print("target ratio >= 0.97")


def run_pair(folders: dict[str, str], args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Start one engine per folder (in the dict's order), then time ``rounds + 1`` rounds of each, alternating."""
    engines = {name: Engine(folder, args) for name, folder in folders.items()}
    rates: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    for r in range(args.rounds + 1):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))  # ABBA: neither always goes first
        for name in order:
            rates[name].append(engines[name].round())
    for engine in engines.values():
        engine.close()
    return rates


if __name__ == "__main__":
    main()
