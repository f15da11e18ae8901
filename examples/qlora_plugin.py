"""QLoRA with the plugin: a 4-bit base (vision tower and projector kept unquantised), LoRA on the LLM,
the norm-alignment modules trained in fp32 alongside, then saved and reloaded.

    python examples/qlora_plugin.py --out qlora-out

Runs on CPU with bitsandbytes' CPU backend on a tiny LLaVA; with a GPU, pass a Hub id with --model.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText

import hf_normalign as normalign
from hf_normalign.testing import tiny_batch, tiny_model

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def load_4bit(path: str) -> torch.nn.Module:
    return AutoModelForImageTextToText.from_pretrained(
        path, quantization_config=normalign.bnb_config(4, path, compute_dtype=torch.float32), device_map="cpu"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="qlora-out")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as base_dir:
        tiny_model("llava").save_pretrained(base_dir)  # stands in for a Hub id
        model = normalign.patch(load_4bit(base_dir), methods=["projector_norm", "moca", "pre"])
        model = normalign.prepare_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
        model = normalign.mark_plugin_trainable(get_peft_model(model, LoraConfig(r=8, target_modules=LORA_TARGETS)))
        model.print_trainable_parameters()

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batch = tiny_batch("llava")
        model.train()
        for step in range(args.steps):
            out = model(**batch)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            print(f"step {step}: loss {out.loss.item():.4f} (PRe {out['pre_loss'].item():.4f})")

        model.save_pretrained(args.out)  # the LoRA adapter (PEFT)
        normalign.save_pretrained(model, args.out, adapter_only=True, include=())  # the plugin
        model.eval()
        with torch.no_grad():
            expected = model(**batch).logits

        reloaded = load_4bit(base_dir)
        normalign.load_plugin_weights(reloaded, args.out)
        reloaded = PeftModel.from_pretrained(reloaded, args.out).eval()
        with torch.no_grad():
            same = torch.equal(reloaded(**batch).logits, expected)
    dtypes = {p.dtype for p in normalign.patching.get_plugin(reloaded).parameters()}
    print(f"reloaded logits equal: {same}; plugin dtypes: {dtypes}")
    if not same:
        raise SystemExit("reloaded model differs")


if __name__ == "__main__":
    main()
