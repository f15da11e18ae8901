"""Mistral 3 (Pixtral vision encoder, patch merger inside the projector)."""

from hf_normalign.spec import ArchitectureSpec

from ._layouts import LLAVA_STYLE

SPEC = ArchitectureSpec(model_type="mistral3", **LLAVA_STYLE)
