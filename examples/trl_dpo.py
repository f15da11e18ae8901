"""Preference tuning of a patched VLM with TRL's DPOTrainer (prompt / chosen / rejected + images).

    python examples/trl_dpo.py --out dpo-out [--lora]

Without LoRA, `trl_kwargs` passes a frozen reference that keeps the initial plugin (TRL would reload an
unpatched one); with LoRA, the reference pass (adapters disabled) runs the plugin's initial weights.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from PIL import Image
from trl import DPOConfig, DPOTrainer

import hf_normalign as normalign
from hf_normalign.integrations.trl import trl_kwargs
from hf_normalign.testing import tiny_model, tiny_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca", "pre"])
    user = [{"type": "image"}, {"type": "text", "text": "what color is the square?"}]
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": user}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "it is red."}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "it is blue."}]}],
                "images": [Image.new("RGB", (32, 32), (200, 20 * i, 10))],
            }
            for i in range(8)
        ]
    )
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        # LLM attention only: bare ["q_proj", "v_proj"] would also put LoRA on the CLIP tower's projections.
        peft_config = LoraConfig(target_modules=r".*language_model.*\.(q_proj|v_proj)")
    config = DPOConfig(
        output_dir=args.out,
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_steps=2,
        max_length=None,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tiny_processor("llava"),
        **trl_kwargs(model, "dpo", peft_config=peft_config),
    )
    trainer.train()
    trainer.save_model(args.out)
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: loss {entry['loss']:.4f}  margin {entry['rewards/margins']:.4f}")
    print(f"saved to {args.out} (plugin files included)")


if __name__ == "__main__":
    main()
