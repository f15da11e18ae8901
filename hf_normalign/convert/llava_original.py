"""Converting an original-format LLaVA-1.5 checkpoint (the training repository's ``LlavaLlamaForCausalLM``, e.g.
``shikiw/LLaVA-v1.5-MoCa-7B``) into a transformers-native ``LlavaForConditionalGeneration`` aligned checkpoint.

What changes, and why:

- weights: ``model.embed_tokens`` / ``model.layers`` / ``model.norm`` move under ``model.language_model``,
  ``model.mm_projector.{0,2}`` become ``model.multi_modal_projector.linear_{1,2}``; old ``rotary_emb.inv_freq``
  buffers are dropped (recomputed from the config). The vision tower (CLIP, not in the original shards) is loaded
  from ``--vision-tower`` or the config's ``mm_vision_tower``, safetensors only.
- MoCa (``model.layers.{i}.modality_layernorm.{scale,shift}``, ``use_moca``) becomes the plugin's MoCa: the
  same ``h <- scale * h + shift`` after the layer's MLP residual, in fp32, on image positions only; on a decode
  step the image mask is all False, so the one-token step is left alone, as the original skips it.
- tokenizer: ``<image>`` and ``<pad>`` are added (the original splices images at a sentinel id, -200, that no
  tokenizer produces); the embedding and ``lm_head`` grow to a multiple of 64 rows with transformers'
  ``resize_token_embeddings(mean_resizing=True)``: new rows are drawn around the old rows' mean (covariance
  scaled by 1e-9, seeded, so a conversion is reproducible). ``<image>`` rows are never read (image features
  replace them) and ``<pad>`` is masked, so the choice does not change any output.
- processor: ``LlavaProcessor`` with an image processor that pads to a square in the mean colour first
  (``do_pad=True``), as ``image_aspect_ratio: pad`` does, and the vicuna_v1 prompt as its chat template.

Memory: the shards are read one at a time with ``safe_open`` into a model built on the meta device, each tensor
assigned in place (no second copy); the output is written in shards of at most ``max_shard_size``.

Example:
    >>> from hf_normalign.convert.llava_original import convert
    >>> convert("shikiw/LLaVA-v1.5-MoCa-7B", "llava-moca-hf")                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from transformers.utils import logging

from ..config import MoCaConfig, NormAlignConfig
from ..methods.moca import moca_key
from ..patching import get_plugin, patch
from .detect import is_original_llava

logger = logging.get_logger(__name__)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
PAD_TO_MULTIPLE_OF = 64  # as transformers' own LLaVA converter: 32000 + 2 tokens -> 32064 rows
RESIZE_SEED = 0
# The LLaVA-1.5 (vicuna_v1) conversation: system line, "USER: <image>\n{question} ASSISTANT: {answer}</s>".
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHAT_TEMPLATE = (
    VICUNA_V1_SYSTEM + "{% for message in messages %} {{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
_RENAMES = (  # original prefix -> LlavaForConditionalGeneration prefix, first match wins
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
_MOCA_KEY = re.compile(r"model\.layers\.(\d+)\.modality_layernorm\.(scale|shift)")
_SKIPPED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # a buffer older saves kept
# Keys of the original config that describe the LLaVA wrapper, not the Llama LLM inside it.
_LLAVA_KEYS = re.compile(r"(mm_|use_mm|use_moca|moca_|image_|tune_|freeze_|tokenizer_|unfreeze_).*")


@dataclass(frozen=True)
class Converted:
    """What :func:`convert` wrote: the folder, whether MoCa was found (plugin files written), its layers."""

    out: str
    moca_layers: tuple[int, ...]
    image_token_id: int
    pad_token_id: int


def _source_folder(source: str, revision: str | None) -> str:
    if os.path.isdir(source):
        return source
    from huggingface_hub import snapshot_download

    # Only what the conversion reads: never pickled weights.
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    return snapshot_download(source, revision=revision, allow_patterns=patterns)


def read_original_config(folder: str) -> dict[str, Any]:
    """The original ``config.json``, checked: an original LLaVA-1.5 layout this converter supports."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} holds no config.json: it is not a model checkpoint.")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not is_original_llava(config):
        raise ValueError(
            f"{folder} is not an original-format LLaVA checkpoint (model_type {config.get('model_type')!r}, "
            f"architectures {config.get('architectures')}); expected model_type 'llava_llama' / "
            "LlavaLlamaForCausalLM. A transformers-native checkpoint needs no conversion: `normalign patch`."
        )
    unsupported = {
        "mm_projector_type": (config.get("mm_projector_type", "linear"), ("mlp2x_gelu",)),
        "mm_use_im_start_end": (config.get("mm_use_im_start_end", False), (False,)),
        "mm_use_im_patch_token": (config.get("mm_use_im_patch_token", False), (False,)),
        "mm_patch_merge_type": (config.get("mm_patch_merge_type", "flat"), ("flat",)),
        "mm_vision_select_feature": (config.get("mm_vision_select_feature", "patch"), ("patch", "cls_patch")),
    }
    bad = {key: value for key, (value, allowed) in unsupported.items() if value not in allowed}
    if bad:
        raise ValueError(
            f"{folder}: settings {bad} are not LLaVA-1.5's (mm_projector_type mlp2x_gelu, no image start/end or "
            "patch tokens, flat patches); this converter handles LLaVA-1.5 checkpoints only."
        )
    return config


def _shards(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        names = ["model.safetensors"]
    else:
        pickled = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth"))]
        extra = f" (it has pickled weights {pickled[:2]}, which hf-normalign never reads)" if pickled else ""
        raise ValueError(f"{folder} holds no safetensors weights{extra}: convert them to safetensors first.")
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise ValueError(f"{folder}: the shards {missing} named in model.safetensors.index.json are missing.")
    return [os.path.join(folder, n) for n in names]


def _target_name(key: str) -> str | None:
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _vision_tower(name: str, dtype: torch.dtype) -> Any:
    from transformers import CLIPVisionModel

    try:
        return CLIPVisionModel.from_pretrained(name, dtype=dtype, use_safetensors=True)
    except OSError as err:
        raise ValueError(
            f"the vision tower {name!r} cannot be loaded as a CLIP vision model from safetensors ({err}). Pass "
            "--vision-tower with a local folder or Hub id that holds it in safetensors (e.g. a saved "
            "openai/clip-vit-large-patch14-336)."
        ) from err


def _dtype(original: dict[str, Any], shards: list[str]) -> torch.dtype:
    """The checkpoint's dtype: its config's ``torch_dtype``, else that of the first LLM tensor (MoCa may be fp32)."""
    named = original.get("torch_dtype") or original.get("dtype")
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        return getattr(torch, named)
    stored = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    with safe_open(shards[0], framework="pt") as f:
        key = next(k for k in f.keys() if not _MOCA_KEY.fullmatch(k))  # noqa: SIM118 (safe_open is not a dict)
        return stored.get(f.get_slice(key).get_dtype(), torch.float32)


def _llava_config(original: dict[str, Any], vision_config: Any, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlavaConfig

    text = {key: value for key, value in original.items() if not _LLAVA_KEYS.fullmatch(key)}
    for key in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        text.pop(key, None)
    text_config = LlamaConfig(**text)
    feature = original.get("mm_vision_select_feature", "patch")
    return LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        projector_hidden_act="gelu",
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if feature == "patch" else "full",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(original.get("tie_word_embeddings", False)),
        dtype=dtype,
    )


def _load_shards(model: Any, shards: list[str]) -> dict[int, dict[str, torch.Tensor]]:
    """Assign every original tensor into ``model`` (built on meta), one shard at a time; return MoCa's."""
    moca: dict[int, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for path in shards:
        part: dict[str, torch.Tensor] = {}
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                found = _MOCA_KEY.fullmatch(key)
                if found:
                    moca.setdefault(int(found.group(1)), {})[found.group(2)] = f.get_tensor(key).float()
                elif _SKIPPED_KEY.fullmatch(key):
                    continue
                elif (target := _target_name(key)) is not None:
                    part[target] = f.get_tensor(key)
                else:
                    unknown.append(key)
        if unknown:
            raise ValueError(
                f"{path} has keys this converter does not know: {unknown[:4]}... (an original LLaVA-1.5 checkpoint "
                "holds model.embed_tokens, model.layers.*, model.norm, lm_head, model.mm_projector.{0,2} and MoCa's "
                "model.layers.*.modality_layernorm)."
            )
        result = model.load_state_dict(part, strict=False, assign=True)
        if result.unexpected_keys:
            raise ValueError(f"{path}: tensors {result.unexpected_keys[:4]} have no place in the converted model.")
        del part  # the model now owns these tensors; nothing else holds them
    empty = [name for name, param in model.named_parameters() if param.is_meta]
    if empty:
        raise ValueError(f"the original checkpoint lacks the weights {empty[:4]} ({len(empty)} in all).")
    return moca


def _tokenizer(folder: str) -> tuple[Any, int, int]:
    """The original tokenizer with ``<image>`` and ``<pad>`` added (kept where they exist); their ids."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)


def _processor(vision_tower: str, tokenizer: Any, vision_config: Any) -> Any:
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    try:
        # do_pad: pad to a square in the mean colour before resizing, as `image_aspect_ratio: pad` does.
        image_processor = LlavaImageProcessorPil.from_pretrained(vision_tower, do_pad=True)
    except OSError as err:
        raise ValueError(
            f"the vision tower {vision_tower!r} has no image processor (preprocessor_config.json): {err}"
        ) from err
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, which the "default" strategy drops again
        chat_template=CHAT_TEMPLATE,
    )


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vision_tower: str | None = None,
    revision: str | None = None,
    max_shard_size: str = "2GB",
) -> Converted:
    """Convert an original-format LLaVA-1.5 checkpoint (folder or Hub id) to an aligned checkpoint in ``out``.

    With MoCa (``use_moca`` and ``modality_layernorm`` weights) ``out`` is an aligned checkpoint (base files plus
    ``normalign_config.json`` / ``normalign.safetensors``), loaded patched by ``normalign.from_pretrained(out)``
    or by transformers after ``import hf_normalign``; without MoCa it is a plain transformers checkpoint.
    ``vision_tower`` overrides the config's ``mm_vision_tower`` (a CLIP folder or Hub id, safetensors).

    Example:
        >>> convert("shikiw/LLaVA-v1.5-MoCa-7B", "llava-moca-hf")                      # doctest: +SKIP
        >>> model = hf_normalign.from_pretrained("llava-moca-hf", dtype=torch.float16)   # doctest: +SKIP
    """
    from accelerate import init_empty_weights
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    folder = _source_folder(os.fspath(source), revision)
    original = read_original_config(folder)
    tower_name = vision_tower or original.get("mm_vision_tower")
    if not tower_name:
        raise ValueError(f"{folder}/config.json names no mm_vision_tower: pass --vision-tower ID_OR_PATH.")
    shards = _shards(folder)
    dtype = _dtype(original, shards)
    tower = _vision_tower(tower_name, dtype)
    tokenizer, image_id, pad_id = _tokenizer(folder)
    processor = _processor(tower_name, tokenizer, tower.config)  # before the weights: its errors come early
    config = _llava_config(original, tower.config, dtype)
    with init_empty_weights():  # parameters on meta, buffers (rotary inv_freq) real
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    moca = _load_shards(model, shards)
    _check_moca(folder, original, moca, config.text_config.num_hidden_layers)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RESIZE_SEED)
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=PAD_TO_MULTIPLE_OF, mean_resizing=True)
    model.config.image_token_id = image_id
    model.config.text_config.pad_token_id = pad_id
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.generation_config.pad_token_id = pad_id
    model.name_or_path = os.fspath(source)  # recorded as the base in normalign_config.json and the model card
    model.eval()

    if moca:
        layers = sorted(moca)
        all_layers = layers == list(range(config.text_config.num_hidden_layers))
        patch(model, NormAlignConfig(moca=MoCaConfig(layers=None if all_layers else layers)), init_weights=False)
        state = {f"moca.{moca_key(i)}.{name}": value for i, pair in moca.items() for name, value in pair.items()}
        get_plugin(model).load_state_dict(state, strict=True)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.save_pretrained(out)
    return Converted(os.fspath(out), tuple(sorted(moca)), image_id, pad_id)


def _check_moca(folder: str, original: dict[str, Any], moca: dict[int, dict[str, torch.Tensor]], layers: int) -> None:
    # `use_mm_norm` is the flag's name in an earlier revision of the MIR repository.
    use_moca = bool(original.get("use_moca", original.get("use_mm_norm", False)))
    if moca and not use_moca:
        raise ValueError(
            f"{folder} holds MoCa weights (modality_layernorm) but its config says use_moca: false; the original "
            "code would not apply them. Fix config.json (use_moca: true, or remove the weights) and convert again."
        )
    if use_moca and not moca:
        raise ValueError(f"{folder} says use_moca: true but holds no model.layers.*.modality_layernorm weights.")
    incomplete = [i for i, pair in moca.items() if set(pair) != {"scale", "shift"} or not 0 <= i < layers]
    if incomplete:
        raise ValueError(
            f"{folder}: MoCa weights of layers {incomplete} are incomplete or out of range (0..{layers - 1})."
        )
