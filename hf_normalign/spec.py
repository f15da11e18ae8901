"""`ArchitectureSpec`: where the projector, LLM and vision tower of one VLM family are (a declarative record).

The built-in specs are in `hf_normalign.specs` (one module per family); `hf_normalign.registry` keys them by
`config.model_type`. Paths are dotted attribute paths from the `...ForConditionalGeneration` instance and are
resolved at call time, so wrappers that swap a module (PEFT's `modules_to_save`) are followed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class TinyRecipe:
    """How `hf_normalign.testing` builds a tiny offline model, tokenizer, processor and batch of one family.

    The strings name layouts implemented once in `hf_normalign.testing` (shared by several families), so a
    family's test recipe is data next to its spec and the testing code holds no per-family table.

    Args:
        config: keyword arguments of `AutoConfig.for_model(model_type, ...)` for the tiny model.
        specials: tokenizer attribute -> (token, id) of the family's named special tokens.
        prompt_image: what a prompt holds for one image (the processor expands it).
        image_tokens: placeholder count rule: "vit", "anyres", "anyres_overview" (LLaVA-OneVision: several
            images get the overview tile only), "merged_grid" (Qwen), "shuffled" (InternVL), "fixed"
            (`mm_tokens_per_image`), "scaled" (Idefics3), "merged" (Pixtral).
        image_block: ids around the placeholders: "plain", "wrapped", "idefics", "pixtral".
        pixels: pixel inputs: "flat", "sized", "anyres", "anyres_batched" (+ `batch_num_images`), "grid_thw"
            (Qwen patches + `image_grid_thw`), "tiled" (Idefics3 + `pixel_attention_mask`).
        processor: processor builder: "llava", "onevision", "qwen", "internvl", "gemma3", "idefics", "paligemma",
            "pixtral"; `processor_classes` names its transformers (processor, image processor) classes.
        token_type: "mm" (Qwen `mm_token_type_ids`), "image" (Gemma3) or "prefix" (PaliGemma) `token_type_ids`.
        extra_tokens: unnamed special tokens at fixed ids.
        width_key: (section, key) of the config value that must equal the text hidden size ("" = top level).
        vision_cls: the vision tower emits a CLS token (CLIP), kept with the "full" feature strategy.
    """

    config: Mapping[str, Any]
    specials: Mapping[str, tuple[str, int]]
    prompt_image: str
    image_tokens: str
    image_block: str
    pixels: str
    processor: str
    processor_classes: tuple[str, ...] = ()
    token_type: str = ""
    extra_tokens: tuple[tuple[str, int], ...] = ()
    width_key: tuple[str, str] | None = None
    vision_cls: bool = False


@dataclass(frozen=True)
class ProcessorParts:
    """What a :class:`BuildRecipe`'s ``processor`` builds the family's processor from."""

    image_processor: Any
    tokenizer: Any
    vision_config: Any
    vision_feature_select_strategy: str
    num_additional_image_tokens: int  # 1 for CLIP's CLS token, 0 for SigLIP
    image_token: str
    video_token: str
    chat_template: str


@dataclass(frozen=True)
class BuildRecipe:
    """How :func:`hf_normalign.build_vlm` assembles a VLM of this family from a vision encoder and a causal LM.

    Args:
        image_processor: ``(vision_config, normalisation, pinpoints) -> image processor``; ``normalisation`` is
            the encoder's ``{"image_mean": ..., "image_std": ...}``, ``pinpoints`` the anyres resolutions.
        processor: ``(ProcessorParts) -> processor``.
        anyres: the config takes ``image_grid_pinpoints`` (and the model an ``image_newline``).
        video: the family has a video placeholder too (``video_token_id``, the tokenizer's ``video_token``).
    """

    image_processor: Callable[[Any, dict[str, list[float]], list[list[int]]], Any]
    processor: Callable[[ProcessorParts], Any]
    anyres: bool = False
    video: bool = False


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
        placeholder_outside_vocab: the model itself swaps a placeholder id beyond its vocabulary for a valid one
            before embedding (Gemma 3, PaliGemma), so `patch` accepts such an id; elsewhere it must be < the number
            of input-embedding rows.
        vision_grid: how an image's vision tokens lie on its picture, for the diagnostics' patch labels:
            ``"square"`` (a square count of tokens is one row-major grid) or ``"overview_tile"`` (an overview
            tile of (image_size / patch_size)^2 tokens first, then high-res tiles: LLaVA-NeXT / OneVision).
        tiny: the recipe `hf_normalign.testing` builds tiny models of this family from (built-in families).
        build: how `build_vlm` assembles this family from parts; None: it cannot.

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
    placeholder_outside_vocab: bool = False
    tiny: TinyRecipe | None = field(default=None, compare=False, repr=False)
    build: BuildRecipe | None = field(default=None, compare=False, repr=False)

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
        """The placeholder ids of the vision positions, read from `config`: integers >= 0, or a clear error."""
        ids = []
        for attr in (self.image_token_attr, self.video_token_attr):
            value = None if attr is None else getattr(config, attr, None)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"config.{attr} of this {self.model_type!r} model is {value!r} ({type(value).__name__}); it must "
                    "be the id of the placeholder token, an integer >= 0. " + self.token_attr_hint(attr)
                )
            ids.append(value)
        if not ids:
            raise ValueError(
                f"config.{self.image_token_attr} is not set on this {self.model_type!r} config "
                f"({type(config).__name__}), so the vision positions cannot be found. "
                + self.token_attr_hint(self.image_token_attr, renamed=True)
            )
        return ids

    def token_attr_hint(self, attr: str, *, renamed: bool = False) -> str:
        """How to give a model the placeholder id that config attribute `attr` should hold (and, `renamed`, how to
        read it from another attribute)."""
        kind = "video" if attr == self.video_token_attr else "image"
        hint = (
            f"Set it to the {kind} placeholder's id, e.g. `model.config.{attr} = "
            f"processor.tokenizer.convert_tokens_to_ids(processor.{kind}_token)`"
        )
        if not renamed:
            return hint + "."
        return hint + (
            "; if your config stores it under another name, register a spec that reads that one: "
            "`hf_normalign.register_architecture(dataclasses.replace(hf_normalign.get_spec("
            f"{self.model_type!r}), {kind}_token_attr='<name>'), overwrite=True)`."
        )

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
        # Absent (renamed, or a custom config); present but None is `vision_token_ids`' to report.
        tokens = [a for a in (self.image_token_attr, self.video_token_attr) if a is not None and not hasattr(config, a)]
        missing += [f"config attribute {attr!r}" for attr in tokens]
        if getattr(config.get_text_config(), "hidden_size", None) is None:
            missing.append("config attribute 'text_config.hidden_size'")
        if missing and len(missing) == len(tokens):  # only the placeholder id is missing: the user can set it
            raise ValueError(
                f"This {self.model_type!r} model's config ({type(config).__name__}) has no attribute "
                f"{' or '.join(map(repr, tokens))}, which hf-normalign reads to find the vision positions. "
                + self.token_attr_hint(tokens[0], renamed=True)
            )
        if missing:
            import transformers

            raise ValueError(
                f"The hf-normalign spec for {self.model_type!r} does not match {type(model).__name__} under "
                f"transformers {transformers.__version__}: missing {', '.join(missing)}. This transformers "
                "release is outside the range hf-normalign supports (see README), or the model is not the "
                "`...ForConditionalGeneration` class; register a matching spec with "
                "`hf_normalign.register_architecture(spec, overwrite=True)`."
            )
