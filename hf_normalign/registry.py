"""Where things live in each VLM family: a declarative spec per `config.model_type`.

The specs themselves are in `hf_normalign.patches` (one module per family); this module holds the
dataclass, the registry and the lookups. Paths are dotted attribute paths from the
`...ForConditionalGeneration` instance and are resolved at call time, so wrappers that swap a
module (PEFT's `modules_to_save`) are followed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_REGISTRY: dict[str, ArchitectureSpec] = {}


VISION_GRIDS: tuple[str, ...] = ("square", "overview_tile")


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the projector, LLM and vision tower of one VLM family are.

    Args:
        model_type: the `config.model_type` this spec serves.
        projector: path of the module whose output is the vision tokens entering the LLM.
        language_model: path of the decoder stack; it holds `layers_attr` and `embed_attr`.
        vision_tower: path of the vision encoder (frozen in stage 1, skipped by quantisation).
        input_module: path of the module that first receives `input_ids` and builds
            `inputs_embeds` (the vision positions are read there).
        image_token_attr / video_token_attr: config attributes holding the placeholder token ids.
        extra_projectors: paths of further projectors whose outputs also reach the vision positions
            (Qwen3-VL's deepstack mergers, a ModuleList).
        layers_attr / embed_attr: attribute names of the decoder layers and input embedding on the
            language model.
        vision_grid: how an image's vision tokens lie on its picture, for the diagnostics' patch labels:
            ``"square"`` (a square count of tokens is one row-major grid) or ``"overview_tile"`` (an overview
            tile of (image_size / patch_size)^2 tokens first, then high-res tiles: LLaVA-NeXT / OneVision).

    Example:
        >>> spec = ArchitectureSpec(
        ...     model_type="my_vlm", projector="model.connector", language_model="model.text_model",
        ...     vision_tower="model.vision_model")
        >>> register_architecture(spec)  # doctest: +SKIP
    """

    model_type: str
    projector: str
    language_model: str
    vision_tower: str
    input_module: str = "model"
    image_token_attr: str = "image_token_id"
    video_token_attr: str | None = None
    extra_projectors: tuple[str, ...] = ()
    layers_attr: str = "layers"
    embed_attr: str = "embed_tokens"
    lm_head: str = "lm_head"
    vision_grid: str = "square"

    def __post_init__(self) -> None:
        if self.vision_grid not in VISION_GRIDS:
            raise ValueError(f"vision_grid must be one of {', '.join(VISION_GRIDS)}, got {self.vision_grid!r}")

    def get(self, model: nn.Module, path: str) -> nn.Module:
        try:
            return model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(
                f"The {self.model_type!r} spec expects a module at {path!r} but {type(model).__name__} has none. "
                "Pass the `...ForConditionalGeneration` model, or register a spec that matches it."
            ) from err

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.get(model, self.language_model), self.layers_attr)

    def input_embeddings(self, model: nn.Module) -> nn.Module:
        return getattr(self.get(model, self.language_model), self.embed_attr)

    def vision_token_ids(self, config) -> list[int]:
        ids = [getattr(config, self.image_token_attr, None)]
        if self.video_token_attr is not None:
            ids.append(getattr(config, self.video_token_attr, None))
        ids = [int(i) for i in ids if i is not None]
        if not ids:
            raise ValueError(
                f"config.{self.image_token_attr} is not set on this {self.model_type!r} config, so vision "
                "positions cannot be found. Set it to the image placeholder token id."
            )
        return ids

    def hidden_size(self, config) -> int:
        return int(config.get_text_config().hidden_size)

    def validate(self, model: nn.Module) -> None:
        """Check that every path and config attribute of this spec resolves on `model`.

        Run at patch time (and on every built-in family by the tests), so a transformers release that moves a
        module fails with one error naming the family, each missing attribute and the transformers version,
        instead of deep inside a hook.
        """
        missing = []
        paths = [self.projector, self.language_model, self.vision_tower, self.input_module, self.lm_head]
        for path in [*paths, *self.extra_projectors]:
            try:
                model.get_submodule(path)
            except AttributeError:
                missing.append(f"module {path!r}")
        language_model = (
            model.get_submodule(self.language_model) if f"module {self.language_model!r}" not in missing else None
        )
        if language_model is not None:
            for attr in (self.layers_attr, self.embed_attr):
                if not hasattr(language_model, attr):
                    missing.append(f"module {self.language_model}.{attr!r}")
        config = model.config
        for attr in (self.image_token_attr, self.video_token_attr):
            if attr is not None and not hasattr(config, attr):  # renamed; None is `vision_token_ids`' to report
                missing.append(f"config attribute {attr!r}")
        if getattr(config.get_text_config(), "hidden_size", None) is None:
            missing.append("config attribute 'text_config.hidden_size'")
        if missing:
            import transformers

            raise ValueError(
                f"The hf-normalign spec for {self.model_type!r} does not match {type(model).__name__} under "
                f"transformers {transformers.__version__}: missing {', '.join(missing)}. This transformers "
                "release is outside the range hf-normalign supports (see README), or the model is not the "
                "`...ForConditionalGeneration` class; register a matching spec with "
                "`hf_normalign.register_architecture(spec, overwrite=True)`."
            )


def register_architecture(spec: ArchitectureSpec, *, overwrite: bool = False) -> ArchitectureSpec:
    """Register a spec for a VLM family, keyed by `spec.model_type`. Returns the spec."""
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(f"register_architecture expects an ArchitectureSpec, got {type(spec).__name__}")
    if spec.model_type in _REGISTRY and not overwrite and _REGISTRY[spec.model_type] != spec:
        raise ValueError(
            f"An architecture is already registered for model_type {spec.model_type!r}; "
            "pass overwrite=True to replace it."
        )
    _REGISTRY[spec.model_type] = spec
    return spec


def supported_architectures() -> list[str]:
    """The `config.model_type` values hf-normalign can patch, sorted."""
    _load_builtin_patches()
    return sorted(_REGISTRY)


def get_spec(model_or_config) -> ArchitectureSpec:
    """The spec for a model or config; a clear error for anything unsupported."""
    _load_builtin_patches()
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
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


_builtin_loaded = False


def _load_builtin_patches() -> None:
    global _builtin_loaded
    if not _builtin_loaded:
        _builtin_loaded = True
        import hf_normalign.patches  # noqa: F401  (registers the built-in families)
