"""Tiny aligned checkpoints for the vLLM test, example and benchmark (offline, seconds to build).

Not imported by the plugin itself (it needs the full ``hf_normalign``)::

    from normalign_vllm.testing import save_tiny_aligned
    folder, base_folder = save_tiny_aligned("/tmp/tiny")   # aligned checkpoint and its plain base
"""

from __future__ import annotations

import os

import torch

SPREAD = 0.5  # plugin parameters drawn around the identity: large enough to change greedy tokens
# vLLM's CPU attention kernels take head_dim 32 and up; testing's default LM has head_dim 16.
SERVABLE_TEXT = {"hidden_size": 64, "head_dim": 32}


def perturb_plugin(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the LayerNorm gain/bias and MoCa scale/shift non-identity values (``scale ~ N(1, s)``, rest ``N(0, s)``).

    The gain is drawn around ``|N(1, s)|`` times its text-scale init, so vision rows stay in the text range.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.normalign.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * SPREAD
            is_gain = name.endswith(("weight", "scale")) and not name.startswith("pre_head")
            param.copy_(param * (1 + noise).abs() if is_gain else param + noise)


def build_tiny_aligned(family: str = "llava", *, seed: int = 0, **text_overrides):
    """(patched tiny model with perturbed projector_norm + MoCa, its processor)."""
    import hf_normalign as normalign
    from hf_normalign.testing import tiny_model, tiny_processor

    model = tiny_model(family, seed=seed, **{**SERVABLE_TEXT, **text_overrides})
    normalign.patch(model, methods=["projector_norm", "moca"])
    perturb_plugin(model, seed=seed)
    return model, _servable_processor(tiny_processor(family))


def _servable_processor(processor):
    """``processor`` with the video processor vLLM loads for Qwen-VL (testing's tiny one has none: no videos)."""
    if not type(processor).__name__.startswith("Qwen2"):
        return processor
    from transformers import Qwen2VLVideoProcessor

    images = processor.image_processor
    video = Qwen2VLVideoProcessor(
        size=images.size,
        patch_size=images.patch_size,
        merge_size=images.merge_size,
        temporal_patch_size=images.temporal_patch_size,
    )
    return type(processor)(image_processor=images, tokenizer=processor.tokenizer, video_processor=video)


def save_tiny_aligned(root: str, family: str = "llava", *, seed: int = 0, **text_overrides) -> tuple[str, str]:
    """Save the aligned checkpoint to ``root/aligned`` and the same weights without the plugin to ``root/base``."""
    import hf_normalign as normalign

    model, processor = build_tiny_aligned(family, seed=seed, **text_overrides)
    aligned, base = os.path.join(root, "aligned"), os.path.join(root, "base")
    normalign.save_pretrained(model, aligned)
    processor.save_pretrained(aligned)
    normalign.unpatch(model).save_pretrained(base)
    processor.save_pretrained(base)
    return aligned, base


# --- running vLLM in a child process (plugins load once per process; VLLM_PLUGINS picks them) ------------

PROMPTS = (  # different lengths; with the tiny tokenizer LLaVA's images start at positions 8, 8 and 50
    "USER: {image} describe",
    "USER: {image} what is this picture about, in a few words please",
    "a long question about the colours and the shapes that come before the image {image} now",
)
# What stands for one image in a prompt, by family (the processor expands it to the image's tokens).
IMAGE_TEXT = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}
IMAGE_TEXT["qwen2_5_vl"] = IMAGE_TEXT["qwen2_vl"]


def prompts(family: str = "llava") -> list[str]:
    """``PROMPTS`` with ``family``'s image placeholder."""
    return [p.format(image=IMAGE_TEXT[family]) for p in PROMPTS]


ENGINE_DEFAULTS = {"dtype": "float32", "max_model_len": 256, "seed": 0, "max_num_seqs": 4, "enforce_eager": True}


def tiny_images(n: int = len(PROMPTS)) -> list:
    """``n`` distinct 32x32 RGB images (deterministic noise)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(1234)
    pixels = torch.randint(0, 256, (n, 32, 32, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(p.numpy()) for p in pixels]


def transformers_generate(model, processor, max_new_tokens: int = 8, family: str = "llava") -> list[list[int]]:
    """Greedy new-token ids of ``model`` for ``prompts(family)`` with ``tiny_images()``, one request at a time."""
    out = []
    for prompt, image in zip(prompts(family), tiny_images(), strict=True):
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(ids[0, inputs["input_ids"].shape[1] :].tolist())
    return out


def vllm_generate(
    folder: str, *, family: str = "llava", plugins: bool = True, repeats: int = 1, max_new_tokens: int = 8, **engine
) -> list:
    """Greedy new-token ids from vLLM for ``prompts(family)`` as one batch, ``repeats`` times, in a child process.

    ``plugins=False`` starts vLLM with no general plugin (``VLLM_PLUGINS=""``): plain vLLM on the same folder.
    """
    import json
    import subprocess
    import sys

    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    if not plugins:
        env["VLLM_PLUGINS"] = ""
    job = {"folder": folder, "family": family, "repeats": repeats, "max_new_tokens": max_new_tokens, "engine": engine}
    result = subprocess.run(
        [sys.executable, "-m", "normalign_vllm.testing"], input=json.dumps(job), env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"vLLM run failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _serve_job() -> None:
    import json
    import sys

    from vllm import LLM, SamplingParams

    job = json.loads(sys.stdin.read())
    llm = LLM(model=job["folder"], **{**ENGINE_DEFAULTS, **job["engine"]})
    pairs = zip(prompts(job["family"]), tiny_images(), strict=True)
    requests = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in pairs]
    params = SamplingParams(temperature=0, max_tokens=job["max_new_tokens"])
    runs = [[list(o.outputs[0].token_ids) for o in llm.generate(requests, params)] for _ in range(job["repeats"])]
    print(json.dumps(runs))


if __name__ == "__main__":
    _serve_job()
