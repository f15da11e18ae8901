"""Watch MIR while the HF Trainer aligns the projector (stage-1 style), with early stopping on MIR.

    python examples/trainer_mir_callback.py --steps 6 --every 2

A tiny LLaVA patched with the projector LayerNorm and MoCa trains its projector and plugin on random
tiny batches; `MIRCallback` measures MIR every few steps on a fixed probe subset and logs it next to
the loss (`trainer.state.log_history`, TensorBoard, W&B...).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import Trainer, TrainingArguments

import hf_normalign as normalign
from hf_normalign.testing import tiny_batch, tiny_model, tiny_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2, help="MIR every N optimizer steps")
    parser.add_argument("--patience", type=int, default=None, help="stop when MIR has not improved N times")
    args = parser.parse_args()

    model = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca"])
    for name, param in model.named_parameters():  # stage 1: projector + plugin only
        param.requires_grad = name.startswith(("normalign.", "model.multi_modal_projector."))
    rows = [tiny_batch(model, batch_size=1, seed=i) for i in range(16)]

    def collate(batch):
        return {key: torch.cat([row[key] for row in batch]) for key in batch[0]}

    mir = normalign.MIRCallback(
        tiny_processor("llava"), every_n_steps=args.every, num_samples=8, early_stopping_patience=args.patience
    )
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            out,
            max_steps=args.steps,
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            warmup_steps=0.03,
            lr_scheduler_type="cosine",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=rows,
            data_collator=collate,
            callbacks=[normalign.NormAlignCallback(), mir],
        )
        trainer.train()
    for entry in trainer.state.log_history:
        if "mir" in entry:
            print(f"step {entry['step']:>3}: MIR {entry['mir']:.4f}")


if __name__ == "__main__":
    main()
