"""Built-in architecture specs, one module per VLM family; importing this package registers them.

To add a family, copy the closest module, point the paths at the new model's modules, and import it
here (or call `hf_normalign.register_architecture` from your own code).
"""

from . import (
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_onevision,
    mistral3,
    paligemma,
    qwen2_5_vl,
    qwen2_vl,
    qwen3_vl,
    smolvlm,
)

__all__ = [
    "gemma3",
    "idefics3",
    "internvl",
    "llava",
    "llava_next",
    "llava_onevision",
    "mistral3",
    "paligemma",
    "qwen2_5_vl",
    "qwen2_vl",
    "qwen3_vl",
    "smolvlm",
]
