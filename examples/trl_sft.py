"""Supervised fine-tuning of a patched VLM with TRL's SFTTrainer (messages + images), optionally with LoRA.

    python examples/trl_sft.py --out sft-out [--lora]

A tiny offline LLaVA stands in for a real one (swap in `AutoModelForImageTextToText.from_pretrained(...)` and
its processor). `trl_kwargs` keeps the plugin trainable under LoRA, the PRe weight right under gradient
accumulation, and writes the plugin beside the adapter in every checkpoint.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from PIL import Image
from trl import SFTConfig, SFTTrainer

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
    data = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]},
                    {"role": "assistant", "content": [{"type": "text", "text": f"a red square number {i}."}]},
                ],
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
    config = SFTConfig(
        output_dir=args.out,
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_steps=2,
        max_length=None,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tiny_processor("llava"),
        **trl_kwargs(model, "sft", peft_config=peft_config),
    )
    trainer.train()
    trainer.save_model(args.out)
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: loss {entry['loss']:.4f}  pre_loss {entry['pre_loss']:.4f}")
    print(f"saved to {args.out} (plugin files included)")


if __name__ == "__main__":
    main()
