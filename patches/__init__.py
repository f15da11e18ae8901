"""Built-in architecture specs (not patches: the package keeps its historical name), one module per VLM family.

Each module holds `SPEC`, the `ArchitectureSpec` of its family; `hf_normalign.registry` registers `SPECS` on
its first lookup. To add a family, copy the closest module, point the paths at the new model's modules, and
list it here (or call `hf_normalign.register_architecture` from your own code).
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

SPECS = tuple(
    module.SPEC
    for module in (
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
)

__all__ = [
    "SPECS",
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
