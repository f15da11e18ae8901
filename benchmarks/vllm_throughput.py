"""Generation throughput of an aligned checkpoint vs its base in vLLM (tokens/s, ratio; target >= 0.97).

Run with the vLLM environment (bash scripts/make_vllm_env.sh); CPU here, CUDA where vLLM's CUDA build is installed:

    .vllm-venv/bin/python benchmarks/vllm_throughput.py            # --quick for a smoke run

Both folders hold the same weights (LLaVA-shaped, random); the aligned one adds the projector LayerNorm and MoCa
on every layer. Each is served by the transformers backend in its own process (the plugin is installed in both;
it does nothing for the base folder). A batch of image requests generates a fixed number of tokens (EOS
ignored) per round; the median of the timed rounds after one warm-up is reported.
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

from normalign_vllm.testing import PROMPTS, save_tiny_aligned, tiny_images

MODEL = {"hidden_size": 512, "head_dim": 64, "num_attention_heads": 8, "intermediate_size": 1024}
ENGINE = {"dtype": "float32", "max_model_len": 512, "seed": 0, "model_impl": "transformers"}


def _child(folder: str, requests: int, tokens: int, rounds: int, eager: bool) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, enforce_eager=eager, max_num_seqs=requests, **ENGINE)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    images = tiny_images(requests)
    batch = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images, strict=True)]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    rates = []
    for _ in range(rounds + 1):  # the first round warms up
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        rates.append(sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed)
    print(json.dumps(rates[1:]))


def measure(folder: str, args: argparse.Namespace) -> float:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
    command = [sys.executable, __file__, "--child", folder, "--requests", str(args.requests)]
    command += ["--tokens", str(args.tokens), "--rounds", str(args.rounds), *(["--eager"] if args.eager else [])]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-4000:])
    return statistics.median(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="no torch.compile (enforce_eager)")
    parser.add_argument("--quick", action="store_true", help="2 requests x 8 tokens, 1 round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.tokens, args.rounds = 2, 8, 1
    if args.child:
        _child(args.child, args.requests, args.tokens, args.rounds, args.eager)
        return
    aligned, base = save_tiny_aligned(tempfile.mkdtemp(prefix="normalign-bench-"), num_hidden_layers=4, **MODEL)
    rates = {"base": measure(base, args), "aligned": measure(aligned, args)}
    print("| checkpoint | tokens/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} |")
    print(f"ratio aligned/base: {rates['aligned'] / rates['base']:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
