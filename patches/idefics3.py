"""Idefics3."""

from hf_normalign.spec import ArchitectureSpec

from ._layouts import IDEFICS_STYLE

SPEC = ArchitectureSpec(model_type="idefics3", **IDEFICS_STYLE)
