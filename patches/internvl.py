"""InternVL, the transformers-native `InternVLForConditionalGeneration` (no remote code)."""

from hf_normalign.registry import ArchitectureSpec, register_architecture

from ._layouts import LLAVA_STYLE

SPEC = register_architecture(ArchitectureSpec(model_type="internvl", **LLAVA_STYLE))
