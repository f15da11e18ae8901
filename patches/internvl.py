"""InternVL, the transformers-native `InternVLForConditionalGeneration` (no remote code)."""

from hf_normalign.spec import ArchitectureSpec

from ._layouts import LLAVA_STYLE

SPEC = ArchitectureSpec(model_type="internvl", **LLAVA_STYLE)
