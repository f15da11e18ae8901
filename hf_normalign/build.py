"""Build a LLaVA-style VLM from a vision encoder and a base LLM, as the papers do before stage-1 training.

The result is a transformers-native ``LlavaForConditionalGeneration`` (``LlavaNext...`` /
``LlavaOnevision...`` for the anyres families) and its processor: the vision tower and the LLM are the
given checkpoints' weights, unchanged; the projector is freshly initialised the way LLaVA-1.5 builds it
(``nn.Linear`` defaults: Kaiming-uniform weights, uniform biases); the image token is added to the tokenizer
(embeddings resized when the table is too small); the processor carries a chat template. ``save_pretrained``
writes a checkpoint plain transformers loads as that family.

Example (the LLaVA-1.5 parts)::

    import hf_normalign as normalign
    model, processor = normalign.build_vlm(
        "openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5", dtype=torch.bfloat16)
    model = normalign.patch(model, methods=["projector_norm", "moca", "pre"])   # then stage 1
    model.save_pretrained("out/base"); processor.save_pretrained("out/base")

Recipes check their ``build:`` section with :func:`check_section` while parsing and build it with
:func:`materialize` when training is set up.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .registry import get_spec, supported_architectures
from .spec import BuildRecipe, ProcessorParts

__all__ = ["CHAT_TEMPLATES", "FAMILIES", "PROJECTORS", "build_from_config", "build_vlm", "check_section", "materialize"]

# The families whose spec says how to assemble them (`ArchitectureSpec.build`).
FAMILIES: tuple[str, ...] = tuple(name for name in supported_architectures() if get_spec(name).build is not None)
PROJECTORS: dict[str, str] = {"mlp2x_gelu": "gelu"}  # LLaVA-1.5 name -> activation between the two Linears
# Vision encoders whose features LLaVA reads; CLIP has a CLS token (dropped by the "default" strategy).
_VISION_TYPES: dict[str, dict[str, Any]] = {
    "clip_vision_model": {"strategy": "default", "extra_tokens": 1, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD},
    "siglip_vision_model": {
        "strategy": "full",
        "extra_tokens": 0,
        "mean": IMAGENET_STANDARD_MEAN,
        "std": IMAGENET_STANDARD_STD,
    },
}
# Anyres grids of LLaVA-NeXT / OneVision, as multiples of the vision tile (scaled to the encoder's image size).
_PINPOINT_TILES = [[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]]

# Conversation formats: LLaVA-1.5's vicuna_v1 ("USER: ... ASSISTANT: ...</s>") and ChatML (Qwen). Images render
# as the image token, before the text of their message as in LLaVA's data; {% generation %} marks the
# assistant tokens for `return_assistant_tokens_mask` (TRL's assistant_only_loss).
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ image_token }}\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{% endif %}"
)
CHAT_TEMPLATES: dict[str, str] = {
    "vicuna_v1": (
        "{% set image_token = 'IMAGE_TOKEN' %}{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] if messages[0]['content'] is string "
        "else messages[0]['content'][0]['text'] %}{% set messages = messages[1:] %}{% else %}"
        "{% set system = 'A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human\\'s questions.' %}{% endif %}"
        "{{ bos_token }}{{ system }}{% for message in messages %}"
        "{% if message['role'] == 'user' %} USER: "
        + _CONTENT
        + "{% else %} ASSISTANT: {% generation %}"
        + _CONTENT
        + "{{ eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    ),
    "chatml": (
        "{% set image_token = 'IMAGE_TOKEN' %}{% if messages[0]['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}{% generation %}"
        + _CONTENT
        + "<|im_end|>{% endgeneration %}{% else %}"
        + _CONTENT
        + "<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}
_DEFAULT_TEMPLATE = {"qwen2": "chatml", "qwen3": "chatml"}  # others (Llama / Vicuna / Mistral): vicuna_v1


def build_vlm(
    vision_model: str | PreTrainedModel,
    language_model: str | PreTrainedModel,
    *,
    family: str = "llava",
    projector: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str | None = None,
    image_token: str = "<image>",
    video_token: str = "<video>",
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    image_processor: Any = None,
    chat_template: str | None = None,
    image_grid_pinpoints: list[list[int]] | None = None,
    pad_to_multiple_of: int | None = 64,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    **load_kwargs: Any,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A new ``family`` VLM from a vision encoder and a causal LM, and its processor.

    Args:
        vision_model: a CLIP / SigLIP checkpoint (Hub id or directory; a full CLIP/SigLIP model works, its
            vision half is used) or a loaded ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``CLIPModel``.
        language_model: a causal LM checkpoint or a loaded ``...ForCausalLM`` (Llama, Vicuna, Qwen2, Mistral...).
            Loaded modules are deep-copied: the caller's modules are left untouched.
        family: ``"llava"`` (LLaVA-1.5), ``"llava_next"`` or ``"llava_onevision"`` (anyres tiles).
        projector: ``"mlp2x_gelu"`` (LLaVA-1.5's Linear-GELU-Linear), freshly initialised with ``seed``.
        vision_feature_layer: the encoder layer the projector reads (-2: the penultimate, as LLaVA-1.5).
        vision_feature_select_strategy: ``"default"`` drops CLIP's CLS token, ``"full"`` keeps every token;
            default: ``"default"`` for CLIP, ``"full"`` for SigLIP (which has no CLS token).
        image_token / video_token: placeholder strings; added to the tokenizer as special tokens when absent
            (OneVision also gets the video token).
        tokenizer: default: the LLM checkpoint's tokenizer (for a loaded LLM: ``language_model.name_or_path``).
        image_processor: default: built from the vision config (image size, CLIP or SigLIP normalisation).
        chat_template: a Jinja template or a name in :data:`CHAT_TEMPLATES`; default ``"chatml"`` for Qwen LLMs,
            ``"vicuna_v1"`` (LLaVA-1.5's conversation format) for the others.
        image_grid_pinpoints: anyres resolutions (anyres families); default: 1x2, 2x1, 2x2, 1x3, 3x1 tiles.
        pad_to_multiple_of: embedding rows are padded to this multiple when the table grows (as llava-hf does).
        dtype: dtype of the parts loaded from checkpoints and of the new projector (default: the LLM's).
        seed: seeds the projector (and anyres ``image_newline``, new embedding rows).
        **load_kwargs: passed to both ``from_pretrained`` calls (``revision``, ``token``, ``local_files_only``...).

    Returns:
        ``(model, processor)``, the model in eval mode on the LLM's device.

    Example:
        >>> model, processor = build_vlm("google/siglip-so400m-patch14-384", "Qwen/Qwen2.5-7B",
        ...                              dtype=torch.bfloat16)  # doctest: +SKIP
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    recipe = get_spec(family).build
    if projector not in PROJECTORS:
        raise ValueError(f"projector must be one of {sorted(PROJECTORS)}, got {projector!r}")
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    vision = _vision_part(vision_model, load_kwargs)
    lm = _language_part(language_model, load_kwargs)
    vtype = _VISION_TYPES.get(vision.config.model_type)
    if vtype is None:
        raise ValueError(
            f"vision model of type {vision.config.model_type!r} is not supported; use a CLIP or SigLIP vision "
            f"model ({sorted(_VISION_TYPES)})."
        )
    strategy = vision_feature_select_strategy or vtype["strategy"]
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
    layers = vision.config.num_hidden_layers
    if not -layers <= vision_feature_layer < layers:
        raise ValueError(f"vision_feature_layer={vision_feature_layer} is out of range for {layers} vision layers.")

    tok = _tokenizer(tokenizer, language_model, lm, load_kwargs)
    tokens = [image_token, video_token] if recipe.video else [image_token]
    tok.add_tokens([t for t in tokens if t not in tok.get_vocab()], special_tokens=True)
    # Named special tokens: the processors read `tokenizer.image_token` before their own argument.
    tok.image_token = image_token
    if recipe.video:
        tok.video_token = video_token
    if tok.pad_token is None:  # LLaVA-1.5 pads with <unk>; TRL's collators need a pad token
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token

    image_size = vision.config.image_size
    pinpoints = image_grid_pinpoints or [[h * image_size, w * image_size] for h, w in _PINPOINT_TILES]
    config = _vlm_config(family, recipe, vision.config, lm.config, tok, tokens, PROJECTORS[projector], pinpoints)
    config.vision_feature_layer = vision_feature_layer
    config.vision_feature_select_strategy = strategy

    model = _assemble(config, vision, lm, seed)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.resize_token_embeddings(len(tok), pad_to_multiple_of=pad_to_multiple_of)
    model.generation_config = copy.deepcopy(lm.generation_config)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()

    template = chat_template or _DEFAULT_TEMPLATE.get(lm.config.model_type, "vicuna_v1")
    template = CHAT_TEMPLATES.get(template, template).replace("IMAGE_TOKEN", image_token)
    norm = {"image_mean": list(vtype["mean"]), "image_std": list(vtype["std"])}
    parts = ProcessorParts(
        image_processor=image_processor or recipe.image_processor(vision.config, norm, pinpoints),
        tokenizer=tok,
        vision_config=vision.config,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=vtype["extra_tokens"],
        image_token=image_token,
        video_token=video_token,
        chat_template=template,
    )
    return model, recipe.processor(parts)


# --- parts -----------------------------------------------------------------------------------------------


def _vision_part(source: str | nn.Module, load_kwargs: dict[str, Any]) -> PreTrainedModel:
    if isinstance(source, str):
        config = AutoConfig.from_pretrained(source, **_hub(load_kwargs))
        # A full CLIP / SigLIP checkpoint: load its vision half only.
        return AutoModel.from_pretrained(source, config=getattr(config, "vision_config", config), **load_kwargs)
    if not isinstance(source, PreTrainedModel):
        raise TypeError(f"vision_model must be a checkpoint id/path or a PreTrainedModel, got {type(source).__name__}")
    inner = getattr(source, "vision_model", None)
    part = inner if hasattr(source.config, "vision_config") and isinstance(inner, PreTrainedModel) else source
    return copy.deepcopy(part).to(dtype=load_kwargs.get("dtype", part.dtype))


def _language_part(source: str | nn.Module, load_kwargs: dict[str, Any]) -> PreTrainedModel:
    if isinstance(source, str):
        return AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    if not isinstance(source, PreTrainedModel) or source.get_output_embeddings() is None:
        raise TypeError(
            f"language_model must be a checkpoint id/path or a loaded ...ForCausalLM, got {type(source).__name__}"
        )
    return copy.deepcopy(source).to(dtype=load_kwargs.get("dtype", source.dtype))


def _hub(load_kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("revision", "token", "cache_dir", "local_files_only", "subfolder")
    return {key: value for key, value in load_kwargs.items() if key in keys}


def _tokenizer(tokenizer, language_model, lm: PreTrainedModel, load_kwargs: dict[str, Any]) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return copy.deepcopy(tokenizer)
    source = tokenizer or (language_model if isinstance(language_model, str) else lm.name_or_path)
    if not source:
        raise ValueError("The loaded language_model does not say where it came from: pass tokenizer=...")
    return AutoTokenizer.from_pretrained(source, **_hub(load_kwargs))


def _vlm_config(
    family: str,
    recipe: BuildRecipe,
    vision_config: PretrainedConfig,
    text_config: PretrainedConfig,
    tok: PreTrainedTokenizerBase,
    tokens: list[str],
    act: str,
    pinpoints: list[list[int]],
) -> PretrainedConfig:
    kwargs: dict[str, Any] = {
        "vision_config": vision_config.to_dict(),
        "text_config": text_config.to_dict(),
        "image_token_id": tok.convert_tokens_to_ids(tokens[0]),
        "projector_hidden_act": act,
        "tie_word_embeddings": bool(getattr(text_config, "tie_word_embeddings", False)),
    }
    if recipe.anyres:
        kwargs["image_grid_pinpoints"] = pinpoints
    if recipe.video:
        kwargs["video_token_id"] = tok.convert_tokens_to_ids(tokens[1])
    return AutoConfig.for_model(family, **kwargs)


def _assemble(config: PretrainedConfig, vision: PreTrainedModel, lm: PreTrainedModel, seed: int) -> PreTrainedModel:
    """The VLM skeleton on the meta device (nothing allocated), with the given parts grafted in."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    device, dtype = lm.device, lm.dtype
    inner = model.model
    inner.vision_tower = vision.to(device)
    inner.language_model = getattr(lm, lm.base_model_prefix)
    model.lm_head = lm.get_output_embeddings()
    # The projector (and anyres image_newline) as LLaVA builds them after loading its parts: torch defaults.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inner.multi_modal_projector = type(inner.multi_modal_projector)(config).to(device=device, dtype=dtype)
        if hasattr(inner, "image_newline"):
            hidden = config.text_config.hidden_size
            inner.image_newline = nn.Parameter(torch.randn(hidden, device=device, dtype=dtype) / math.sqrt(hidden))
    model.config.text_config = inner.language_model.config
    model.config.vision_config = inner.vision_tower.config
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"build_vlm left tensors on the meta device: {left[:5]}; this family layout is unknown.")
    return model


# --- recipes ---------------------------------------------------------------------------------------------


def build_from_config(section: Mapping[str, Any]) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Resolve a recipe's ``build:`` section: ``vision_model`` and ``language_model`` (required), and any other
    :func:`build_vlm` keyword (``family``, ``projector``, ``vision_feature_layer``, ``dtype`` as a string...).

    Example:
        >>> build_from_config({"vision_model": "openai/clip-vit-large-patch14-336",
        ...                    "language_model": "lmsys/vicuna-7b-v1.5", "dtype": "bfloat16"})  # doctest: +SKIP
    """
    options = _build_options(section)
    return build_vlm(options.pop("vision_model"), options.pop("language_model"), **options)


def _build_options(section: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`build_vlm` arguments of a ``build:`` section, checked (ValueError) and with ``dtype`` resolved."""
    if not isinstance(section, Mapping):
        raise ValueError(f"build: must be a mapping of build_vlm arguments, got {type(section).__name__}")
    options = dict(section)
    missing = [key for key in ("vision_model", "language_model") if not options.get(key)]
    if missing:
        raise ValueError(f"build: needs {missing} (checkpoint ids or local paths)")

    allowed = set(inspect.signature(build_vlm).parameters) - {"load_kwargs", "vision_model", "language_model"}
    unknown = sorted(set(options) - allowed - {"vision_model", "language_model"})
    if unknown:
        raise ValueError(f"build: unknown key(s) {unknown}; valid: vision_model, language_model, {sorted(allowed)}")
    dtype = options.get("dtype")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"build: dtype {dtype!r} is not a torch dtype (e.g. bfloat16, float32)")
        options["dtype"] = getattr(torch, dtype)
    return options


def check_section(section: Mapping[str, Any]) -> str:
    """Validate a recipe's ``build:`` section (see :func:`materialize`) without building or writing anything, and
    return its ``save_dir``. Raises ValueError, as :func:`materialize` would: recipes call it while parsing their
    arguments, so that a bad section fails before anything is written.

    Example:
        >>> check_section({"vision_model": "v", "language_model": "l", "save_dir": "out/base"})
        'out/base'
    """
    if not isinstance(section, Mapping):
        raise ValueError(f"build: must be a mapping of build_vlm arguments, got {type(section).__name__}")
    options = dict(section)
    save_dir = options.pop("save_dir", None)
    if not save_dir:
        raise ValueError("build: needs save_dir (where the built base model and processor are written and reused)")
    if not _is_built(save_dir) and os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
        raise ValueError(f"build: save_dir {save_dir} exists and holds no built model: remove it or choose another")
    _build_options(options)
    return save_dir


def _is_built(save_dir: str) -> bool:
    return os.path.isfile(os.path.join(save_dir, "config.json"))


def materialize(section: Mapping[str, Any]) -> str:
    """Build the VLM a recipe's ``build:`` section describes and save it (model + processor) to its ``save_dir``;
    a ``save_dir`` that already holds a model is reused (building is seeded, so it would be the same). The build is
    written to ``<save_dir>.partial`` and renamed into place, so ``save_dir`` is complete or absent. Returns
    ``save_dir``, which the recipe then loads like any ``model_name_or_path``.

    Example (YAML)::

        build:
          vision_model: openai/clip-vit-large-patch14-336
          language_model: lmsys/vicuna-7b-v1.5
          dtype: bfloat16
          save_dir: out/llava15-base
    """
    save_dir = check_section(section)
    if _is_built(save_dir):
        return save_dir
    # Written next to save_dir, then renamed into place: a build killed part-way never leaves a save_dir that a
    # later run would take for a complete one. The next build removes what a killed one left.
    partial = f"{os.path.normpath(save_dir)}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model, processor = build_from_config({key: value for key, value in section.items() if key != "save_dir"})
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    os.replace(partial, save_dir)
    return save_dir
