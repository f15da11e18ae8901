"""Patch a VLM from the Hub with the projector LayerNorm and show what it changes.

    python examples/patch_from_hub.py --model llava-hf/llava-1.5-7b-hf
    python examples/patch_from_hub.py --tiny          # offline: a tiny LLaVA built from config

Without network access (or with --tiny) the script falls back to `hf_normalign.testing`'s tiny model,
so it runs anywhere; the code path after loading is the same.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForImageTextToText

import hf_normalign as normalign
from hf_normalign.testing import tiny_batch, tiny_model


def load(model_id: str | None) -> torch.nn.Module:
    if model_id is None:
        return tiny_model("llava")
    try:
        return AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch.float32)
    except OSError as err:  # offline, or not in the local cache
        print(f"Could not load {model_id} ({type(err).__name__}); using a tiny offline LLaVA instead.")
        return tiny_model("llava")


def vision_norm(model, batch) -> float:
    """Mean L2 norm of the vision tokens as the language model receives them."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    mask = batch["input_ids"] == model.config.image_token_id
    return seen["embeds"][mask].norm(dim=-1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-hf/llava-1.5-7b-hf")
    parser.add_argument("--tiny", action="store_true", help="skip the Hub and use the tiny offline model")
    args = parser.parse_args()

    model = load(None if args.tiny else args.model)
    # Real LLaVA vision tokens arrive with norms of 30-70; make the tiny one as loud.
    if args.tiny or model.config.text_config.hidden_size < 256:
        model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: out * 50)
    batch = tiny_batch(model, with_labels=False) if model.config.text_config.vocab_size <= 256 else None
    if batch is None:
        raise SystemExit("Build a batch with the model's processor here; see README's quickstart.")

    before = vision_norm(model, batch)
    normalign.patch(model, methods="projector_norm")
    after = vision_norm(model, batch)
    target = model.normalign.projector_norm[0].weight.mean().item() * model.config.text_config.hidden_size**0.5
    print(f"patched: {normalign.get_config(model).methods}")
    print(f"vision-token norm entering the LLM: {before:.2f} -> {after:.2f} (text-embedding scale T = {target:.2f})")
    normalign.unpatch(model)
    print(f"unpatched again: {vision_norm(model, batch):.2f}")


if __name__ == "__main__":
    main()
