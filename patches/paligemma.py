"""PaliGemma (Gemma LLM: embeddings scaled by sqrt(hidden_size) inside `embed_tokens`)."""

from hf_normalign.spec import ArchitectureSpec

from ._layouts import LLAVA_STYLE

SPEC = ArchitectureSpec(model_type="paligemma", **LLAVA_STYLE)
