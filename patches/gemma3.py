"""Gemma 3: the LLM scales its embeddings by sqrt(hidden_size) inside `embed_tokens`."""

from hf_normalign.spec import ArchitectureSpec

from ._layouts import LLAVA_STYLE

SPEC = ArchitectureSpec(model_type="gemma3", **LLAVA_STYLE)
