"""SmolVLM."""

from hf_normalign.registry import ArchitectureSpec, register_architecture

from ._layouts import IDEFICS_STYLE

SPEC = register_architecture(ArchitectureSpec(model_type="smolvlm", **IDEFICS_STYLE))
