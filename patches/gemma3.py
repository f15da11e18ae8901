"""Gemma 3: the LLM scales its embeddings by sqrt(hidden_size) inside `embed_tokens`."""

from hf_normalign.registry import ArchitectureSpec, register_architecture

from ._layouts import LLAVA_STYLE

SPEC = register_architecture(ArchitectureSpec(model_type="gemma3", **LLAVA_STYLE))
