"""The registry of VLM families: one `ArchitectureSpec` per `config.model_type`, and the lookups.

The spec dataclass is in `hf_normalign.spec`, the built-in specs in `hf_normalign.specs` (one module per
family), registered here on the first lookup.
"""

from __future__ import annotations

import torch
from torch import nn

from .spec import ArchitectureSpec

_REGISTRY: dict[str, ArchitectureSpec] = {}
_BUILTIN: dict[str, ArchitectureSpec] = {}  # the shipped specs, kept to restore an overridden family


def register_architecture(spec: ArchitectureSpec, *, overwrite: bool = False) -> ArchitectureSpec:
    """Register a spec for a VLM family, keyed by `spec.model_type`. Returns the spec.

    Replacing a registered family (a built-in one included) needs ``overwrite=True`` and affects that family only;
    :func:`unregister_architecture` undoes it.
    """
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(f"register_architecture expects an ArchitectureSpec, got {type(spec).__name__}")
    _load_builtin_specs()  # first, so a user spec is never mistaken for a built-in one, nor one clobbered by it
    if spec.model_type in _REGISTRY and not overwrite and _REGISTRY[spec.model_type] != spec:
        raise ValueError(
            f"An architecture is already registered for model_type {spec.model_type!r}; "
            "pass overwrite=True to replace it."
        )
    _REGISTRY[spec.model_type] = spec
    return spec


def unregister_architecture(model_type: str) -> ArchitectureSpec:
    """Undo :func:`register_architecture` for ``model_type``; returns the spec that was removed.

    A built-in family gets its shipped spec back; another family is no longer supported. Models patched earlier
    keep the spec they were patched with.

    Example:
        >>> import dataclasses, hf_normalign as normalign
        >>> spec = dataclasses.replace(normalign.get_spec("llava"), input_module="model.language_model")
        >>> _ = normalign.register_architecture(spec, overwrite=True)
        >>> normalign.unregister_architecture("llava") is spec
        True
    """
    _load_builtin_specs()
    if model_type not in _REGISTRY:
        raise ValueError(
            f"No architecture is registered for model_type {model_type!r}; registered: {', '.join(sorted(_REGISTRY))}."
        )
    current = _REGISTRY[model_type]
    builtin = _BUILTIN.get(model_type)
    if builtin is None:
        del _REGISTRY[model_type]
    elif current is builtin:
        raise ValueError(
            f"{model_type!r} is a built-in family with its shipped spec: there is no registration to undo "
            "(built-in families cannot be removed)."
        )
    else:
        _REGISTRY[model_type] = builtin
    return current


def supported_architectures() -> list[str]:
    """The `config.model_type` values hf-normalign can patch, sorted."""
    _load_builtin_specs()
    return sorted(_REGISTRY)


def get_spec(model_or_config) -> ArchitectureSpec:
    """The spec for a model, a config or a `model_type`; a clear error for anything unsupported."""
    _load_builtin_specs()
    config = getattr(model_or_config, "config", model_or_config)
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    if isinstance(model_or_config, nn.Module) and not hasattr(config, "vision_config"):
        raise ValueError(
            f"{type(model_or_config).__name__} (model_type {model_type!r}) is a text-only model: hf-normalign "
            "aligns the vision tokens of a vision-language model. Load the `...ForConditionalGeneration` "
            "VLM instead."
        )
    raise ValueError(
        f"Unsupported architecture: model_type {model_type!r}. Supported: {', '.join(sorted(_REGISTRY))}. "
        "For another VLM family, describe it with `hf_normalign.ArchitectureSpec` and call "
        "`hf_normalign.register_architecture(spec)`."
    )


def embedding_scale(model: nn.Module, spec: ArchitectureSpec, *, eps: float = 1e-6, chunk: int = 8192) -> float:
    """Mean L2 norm of the non-zero rows of the input embedding *as the LLM receives it*.

    Calls the embedding module itself, so a scale applied in its forward (Gemma's sqrt(H)) counts.
    """
    embed = spec.input_embeddings(model)
    num_rows = embed.weight.shape[0] if hasattr(embed, "weight") else embed.num_embeddings
    device = embed.weight.device if hasattr(embed, "weight") else None
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, num_rows, chunk):
            ids = torch.arange(start, min(start + chunk, num_rows), device=device)
            norms = embed(ids).double().norm(dim=-1)
            keep = norms > eps
            total += float(norms[keep].sum())
            count += int(keep.sum())
    if count == 0:
        raise ValueError("Every row of the input embedding is zero; pass ProjectorNormConfig(target_norm=...).")
    return total / count


def _load_builtin_specs() -> None:
    if _BUILTIN:
        return
    from hf_normalign.specs import SPECS

    builtin = {spec.model_type: spec for spec in SPECS}
    _REGISTRY.update(builtin)
    _BUILTIN.update(builtin)
