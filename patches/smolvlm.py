"""SmolVLM."""

from hf_normalign.spec import ArchitectureSpec

from ._layouts import IDEFICS_STYLE

SPEC = ArchitectureSpec(model_type="smolvlm", **IDEFICS_STYLE)
