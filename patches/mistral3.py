"""Mistral 3 (Pixtral vision encoder, patch merger inside the projector)."""

from hf_normalign.registry import ArchitectureSpec, register_architecture

from ._layouts import LLAVA_STYLE

SPEC = register_architecture(ArchitectureSpec(model_type="mistral3", **LLAVA_STYLE))
