"""PaliGemma (Gemma LLM: embeddings scaled by sqrt(hidden_size) inside `embed_tokens`)."""

from hf_normalign.registry import ArchitectureSpec, register_architecture

from ._layouts import LLAVA_STYLE

SPEC = register_architecture(ArchitectureSpec(model_type="paligemma", **LLAVA_STYLE))
