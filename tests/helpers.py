"""Independent reference computations shared by the tests (never the library's own code paths)."""

import torch

from hf_normalign.registry import get_spec


def vision_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    ids = [model.config.image_token_id]
    if getattr(model.config, "video_token_id", None) is not None:
        ids.append(model.config.video_token_id)
    return torch.isin(input_ids, torch.tensor(ids))


def capture_llm_inputs(model, batch: dict) -> torch.Tensor:
    """The `inputs_embeds` the language model receives, captured with a plain pre-hook."""
    seen = {}
    lm = get_spec(model).get(model, get_spec(model).language_model)

    def hook(module, args, kwargs):
        seen["x"] = kwargs["inputs_embeds"]

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen["x"]


def embedding_norm_reference(model) -> float:
    """T from the embedding table in float64: mean norm of non-zero rows, times Gemma's scale."""
    embed = model.get_input_embeddings()
    # Gemma-family LLMs multiply embeddings by sqrt(hidden_size) before the first layer.
    hidden = model.config.get_text_config().hidden_size
    scale = hidden**0.5 if model.config.model_type in ("gemma3", "paligemma") else 1.0
    norms = (embed.weight.detach().double() * scale).norm(dim=-1)
    return float(norms[norms > 1e-6].mean())


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def make_vision_loud(model, factor: float = 50.0) -> None:
    """Scale the projector output like real CLIP/SigLIP features (norms far above text).

    Registered before `patch`, so the LayerNorm sees the loud features.
    """
    projector = get_spec(model).get(model, get_spec(model).projector)

    def hook(module, args, output):
        return output * factor

    projector.register_forward_hook(hook)
