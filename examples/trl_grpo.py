"""Reinforcement learning of a patched VLM with TRL's GRPOTrainer (prompt + image, a reward function).

    python examples/trl_grpo.py --out grpo-out [--lora]

GRPO takes no `ref_model`: with `beta > 0` TRL reloads the reference from the model's path, and the callback
from `trl_kwargs` gives it the initial plugin (so the KL term compares against the right model).
"""

from __future__ import annotations

import argparse
import os

import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoModelForImageTextToText
from trl import GRPOConfig, GRPOTrainer

import hf_normalign as normalign
from hf_normalign.integrations.trl import trl_kwargs
from hf_normalign.testing import tiny_model, tiny_processor


def brevity(completions: list, **kwargs) -> list[float]:
    """A toy reward: shorter answers score higher."""
    return [-float(len(str(completion))) for completion in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = os.path.join(args.out, "base")  # stands in for a Hub checkpoint TRL can reload the reference from
    tiny_model("llava").save_pretrained(base)
    model = normalign.patch(
        AutoModelForImageTextToText.from_pretrained(base), methods=["projector_norm", "moca", "pre"]
    )
    user = [{"type": "image"}, {"type": "text", "text": "what color is the square?"}]
    data = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": user}], "image": Image.new("RGB", (32, 32), (200, 20 * i, 10))}
            for i in range(8)
        ]
    )
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        # LLM attention only: bare ["q_proj", "v_proj"] would also put LoRA on the CLIP tower's projections.
        peft_config = LoraConfig(target_modules=r".*language_model.*\.(q_proj|v_proj)")
    config = GRPOConfig(
        output_dir=os.path.join(args.out, "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        beta=0.1,
        learning_rate=1e-3,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=brevity,
        args=config,
        train_dataset=data,
        processing_class=tiny_processor("llava"),
        **trl_kwargs(model, "grpo", peft_config=peft_config),
    )
    trainer.train()
    for entry in trainer.state.log_history:
        if "kl" in entry:
            print(f"step {entry['step']}: reward {entry['reward']:.2f}  kl {entry['kl']:.6f}")


if __name__ == "__main__":
    main()
