"""The machinery shared by the stage-1 and stage-2 recipes: arguments, model set-up per stage, Trainer, saving.

Arguments come from a YAML file (``--config``) overridden by the command line; every key is a field of
:class:`ModelArguments`, :class:`DataArguments`, :class:`RecipeArguments` or ``transformers.TrainingArguments``
(``--learning_rate`` / ``--learning-rate`` on the command line, ``learning_rate:`` in YAML), plus
``--push-to-hub REPO`` (``push_to_hub: REPO`` in YAML). Defaults: the stage's (:data:`STAGE_DEFAULTS`),
then the YAML, then the command line. Everything is validated, the data included, before anything is
written: a config error leaves the output directory untouched.

Usage::

    python -m hf_normalign.recipes.stage1 --config recipes/configs/llava_stage1.yaml --output_dir out/s1
    accelerate launch --config_file hf_normalign/recipes/accelerate/ddp.yaml -m hf_normalign.recipes.stage1 --config ...

    from hf_normalign.recipes.train import main, parse_args, run
    trainer = run(parse_args(["--config", "cfg.yaml"], stage=1))      # returns the Trainer after training
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging as std_logging
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging
from transformers.utils.hub import cached_file

import hf_normalign as normalign
from hf_normalign.config import METHODS, NormAlignConfig
from hf_normalign.data import BadRowError, ConversationDataset, LlavaJsonDataset, VLMDataCollator, from_hf_dataset
from hf_normalign.patching import get_plugin
from hf_normalign.peft_utils import mark_plugin_trainable
from hf_normalign.persistence import CONFIG_NAME, CheckpointInfo
from hf_normalign.quantization import bnb_config, prepare_for_kbit_training
from hf_normalign.recipes import arguments
from hf_normalign.recipes.arguments import (
    COMMON_DEFAULTS,
    DTYPE_NAMES,
    STAGE_DEFAULTS,
    DataArguments,
    ModelArguments,
    RecipeArguments,
)
from hf_normalign.registry import get_spec

logger = logging.get_logger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

DTYPES = {name: name if name == "auto" else getattr(torch, name) for name in DTYPE_NAMES}


class ConfigError(ValueError):
    """The recipe's configuration is invalid; raised before anything is written."""


@dataclass
class RecipeConfig:
    """Everything a run needs, validated."""

    stage: int
    model: ModelArguments
    data: DataArguments
    recipe: RecipeArguments
    training: TrainingArguments
    normalign_config: NormAlignConfig | None  # None: taken from the aligned checkpoint, or the baseline
    model_source: str  # what the weights are loaded from: the model, or the checkpoint a full run resumes from
    resume_from_checkpoint: str | None = None
    push_to_hub: str | None = None
    baseline: bool = False  # --methods none: the recipe without hf-normalign, for the papers' comparison


# --- arguments ---------------------------------------------------------------------------------------------------

_DATACLASSES = (ModelArguments, DataArguments, RecipeArguments, TrainingArguments)


def _parser(stage: int) -> HfArgumentParser:
    parser = HfArgumentParser(
        _DATACLASSES,
        prog=arguments.prog(stage),
        description=arguments.description(stage),
        epilog="Also: --config FILE.yaml (defaults for any option below; packaged names such as llava_stage1 work "
        "too) and --push-to-hub REPO (upload the final checkpoint with normalign.push_to_hub).",
    )
    parser.set_defaults(**COMMON_DEFAULTS, **STAGE_DEFAULTS[stage])
    return parser


def _resolve_config_path(path: str) -> str:
    if os.path.isfile(path):
        return path
    packaged = os.path.join(CONFIG_DIR, path if path.endswith(".yaml") else f"{path}.yaml")
    if os.path.isfile(packaged):
        return packaged
    raise ConfigError(f"config file {path!r} not found (nor a packaged config of that name in {CONFIG_DIR})")


def _yaml_defaults(path: str, parser: HfArgumentParser) -> tuple[dict[str, Any], str | None]:
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value, got {type(values).__name__}")
    hub = values.pop("push_to_hub", None)
    values.pop("build", None)  # read by _build_section
    if hub is not None and not isinstance(hub, str):
        raise ConfigError(f"{path}: push_to_hub takes a Hub repo id, got {hub!r}")
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {unknown}; see --help for the valid ones")
    for key, value in values.items():
        if key == "normalign_config" and isinstance(value, dict):
            values[key] = json.dumps(value)  # a mapping in YAML, JSON text on the command line
            continue
        # argparse converts only string defaults and only for string-typed YAML (1e-3 is a string in YAML 1.1).
        convert = actions[key].type
        try:
            if callable(convert) and isinstance(value, str):
                values[key] = convert(value)
            elif callable(convert) and isinstance(value, list):
                values[key] = [convert(v) if isinstance(v, str) else v for v in value]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise ConfigError(f"{path}: invalid value {value!r} for {key}: {err}") from err
    return values, hub


def parse_args(argv: Sequence[str] | None, stage: int) -> RecipeConfig:
    """Parse ``--config`` YAML + command line into a validated :class:`RecipeConfig` (raises :class:`ConfigError`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --help-training: the full help, TrainingArguments included (--help of the entry points is arguments.help_text)
    argv = ["--help" if arg == arguments.TRAINING_HELP_FLAG else arg for arg in argv]
    # `--push-to-hub REPO` names a repo, unlike TrainingArguments' boolean of the same name: take it first.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--push-to-hub", "--push_to_hub", dest="push_to_hub", metavar="REPO")
    known, rest = pre.parse_known_args(argv)
    parser = _parser(stage)
    hub = None
    if known.config:
        values, hub = _yaml_defaults(_resolve_config_path(known.config), parser)
        parser.set_defaults(**values, **_build_section(_resolve_config_path(known.config)))
    namespace = parser.parse_args(rest)  # usage errors exit with status 2, as argparse does
    given = vars(namespace)
    try:
        model_args, data_args, recipe_args, training_args = (
            cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.init}) for cls in _DATACLASSES
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    return _validate(stage, model_args, data_args, recipe_args, training_args, given, known.push_to_hub or hub)


def _build_section(path: str) -> dict[str, Any]:
    """A ``build:`` section (a VLM from a vision encoder + an LLM, see hf_normalign.build.materialize) becomes
    the ``model_name_or_path`` default: built and saved once to its ``save_dir``, reused after."""
    from hf_normalign.build import materialize

    with open(path, encoding="utf-8") as f:
        section = (yaml.safe_load(f) or {}).get("build")
    if section is None:
        return {}
    try:
        return {"model_name_or_path": materialize(section)}
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: build: {err}") from err


def _validate(
    stage: int,
    model_args: ModelArguments,
    data_args: DataArguments,
    recipe_args: RecipeArguments,
    training_args: TrainingArguments,
    given: dict[str, Any],
    hub: str | None,
) -> RecipeConfig:
    for name in ("model_name_or_path", "data_path", "output_dir"):
        if not given.get(name):
            raise ConfigError(f"--{name} is required (on the command line or in the YAML config)")
    output_dir = training_args.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"output_dir {output_dir} exists and is not a directory")
    if stage == 1 and (model_args.lora or model_args.qlora):
        raise ConfigError("stage 1 trains the projector and plugin on a frozen LLM; --lora/--qlora are stage-2 options")
    if model_args.lora and model_args.qlora:
        raise ConfigError("--lora and --qlora are exclusive (--qlora is LoRA on a 4-bit LLM)")
    if model_args.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {list(DTYPES)}, got {model_args.dtype!r}")
    if data_args.chat_template not in ("auto", "plain"):
        raise ConfigError(f"--chat_template must be 'auto' or 'plain', got {data_args.chat_template!r}")
    if data_args.max_length is not None and data_args.max_length < 1:
        raise ConfigError(f"--max_length must be positive, got {data_args.max_length}")
    if recipe_args.mir_every < 0 or recipe_args.mir_samples < 2:
        raise ConfigError("--mir_every must be >= 0 and --mir_samples >= 2 (MIR needs 2 image-text pairs)")
    _check_data_paths(data_args)
    if hub is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(hub)
        except HFValidationError as err:
            raise ConfigError(f"--push-to-hub: {err}") from err
    baseline = _is_baseline(model_args)
    config = None if baseline else _normalign_config(model_args)
    checkpoint_config = _checkpoint_config(model_args.model_name_or_path)
    if baseline and hub is not None:
        raise ConfigError(
            "--push-to-hub uploads aligned checkpoints with an hf-normalign model card; push a --methods none "
            "baseline with transformers' `model.push_to_hub`"
        )
    if baseline and checkpoint_config is not None:
        raise ConfigError(
            f"--methods none asks for the baseline, but {model_args.model_name_or_path} is an aligned checkpoint "
            f"({checkpoint_config}): start the baseline from the plain base model"
        )
    if config is None and checkpoint_config is None and not baseline:
        raise ConfigError(
            f"{model_args.model_name_or_path} is not an aligned checkpoint: pass --methods "
            f"({','.join(METHODS)}) or --normalign_config"
        )
    if config is not None and checkpoint_config is not None and config != checkpoint_config:
        raise ConfigError(
            f"{model_args.model_name_or_path} is an aligned checkpoint with {checkpoint_config}; --methods / "
            f"--normalign_config ask for {config}. Drop them to continue with the checkpoint's settings."
        )
    resume = _resume_checkpoint(training_args)
    _check_output_dir(output_dir, resume, recipe_args.overwrite_output_dir)
    if resume is not None:
        _check_resume_matches(resume, checkpoint_config or config, baseline)
    peft = model_args.lora or model_args.qlora
    return RecipeConfig(
        stage=stage,
        model=model_args,
        data=data_args,
        recipe=recipe_args,
        training=training_args,
        normalign_config=None if checkpoint_config is not None else config,
        # A full run resumes from the checkpoint's weights (see `load_model`); a PEFT run from the base + adapter.
        model_source=resume if resume and not peft else model_args.model_name_or_path,
        resume_from_checkpoint=resume,
        push_to_hub=hub,
        baseline=baseline,
    )


def _earlier_run(output_dir: str) -> list[str]:
    """What marks ``output_dir`` as holding an earlier run: its checkpoints and final-save files."""
    if not os.path.isdir(output_dir):
        return []
    marks = {CONFIG_NAME, "trainer_state.json", "config.json", "adapter_config.json"}
    return sorted(e for e in os.listdir(output_dir) if e.startswith(PREFIX_CHECKPOINT_DIR) or e in marks)


def _check_output_dir(output_dir: str, resume: str | None, overwrite: bool) -> None:
    found = _earlier_run(output_dir)
    if not found or overwrite:
        return
    if resume is not None and os.path.realpath(os.path.dirname(os.path.abspath(resume))) == os.path.realpath(
        output_dir
    ):
        return  # resuming that very run
    raise ConfigError(
        f"output_dir {output_dir} holds an earlier run ({', '.join(found[:4])}{' ...' if len(found) > 4 else ''}); "
        "its checkpoints would mix with this run's. Choose a new --output_dir, resume it with "
        "--resume_from_checkpoint true, or pass --overwrite_output_dir to replace it"
    )


def _check_resume_matches(checkpoint: str, config: NormAlignConfig | None, baseline: bool = False) -> None:
    """The checkpoint must come from a run with the same hf-normalign settings (none, for the baseline)."""
    path = os.path.join(checkpoint, CONFIG_NAME)
    if baseline:
        if os.path.isfile(path):
            raise ConfigError(f"resume_from_checkpoint {checkpoint} is an hf-normalign run, not a --methods none one")
        return
    if not os.path.isfile(path):
        raise ConfigError(f"resume_from_checkpoint {checkpoint} holds no {CONFIG_NAME}: it is not an hf-normalign run")
    try:
        info = CheckpointInfo.from_file(path)
    except normalign.NormAlignCheckpointError as err:
        raise ConfigError(str(err)) from err
    if config is not None and info.config != config:
        raise ConfigError(
            f"resume_from_checkpoint {checkpoint} was trained with {info.config}, but this run asks for {config}: "
            "resume with the settings of that run, or start a new run in a new --output_dir"
        )


def _remove_earlier_checkpoints(output_dir: str) -> None:
    """--overwrite_output_dir: drop the earlier run's checkpoint-* folders, so a later resume cannot pick one."""
    for entry in _earlier_run(output_dir):
        path = os.path.join(output_dir, entry)
        if entry.startswith(PREFIX_CHECKPOINT_DIR) and os.path.isdir(path):
            logger.warning(f"--overwrite_output_dir: removing {path} of an earlier run")
            shutil.rmtree(path)


def _check_data_paths(data_args: DataArguments) -> None:
    path = data_args.data_path
    if path.endswith((".json", ".jsonl")) and not os.path.isfile(path):
        raise ConfigError(f"data_path {path} does not exist")
    if data_args.image_folder is not None and not os.path.isdir(data_args.image_folder):
        raise ConfigError(f"image_folder {data_args.image_folder} is not a directory")


def _is_baseline(model_args: ModelArguments) -> bool:
    baseline = (model_args.methods or "").strip().lower() == "none"
    if baseline and model_args.normalign_config:
        raise ConfigError("--methods none (the baseline) and --normalign_config contradict each other")
    return baseline


def _normalign_config(model_args: ModelArguments) -> NormAlignConfig | None:
    if model_args.methods and model_args.normalign_config:
        raise ConfigError("pass either --methods or --normalign_config, not both")
    try:
        if model_args.methods:
            return NormAlignConfig.from_methods([m.strip() for m in model_args.methods.split(",") if m.strip()])
        if model_args.normalign_config:
            text = model_args.normalign_config
            if not text.lstrip().startswith("{"):
                with open(text, encoding="utf-8") as f:
                    text = f.read()
            return NormAlignConfig.from_dict(json.loads(text))
    except (OSError, TypeError, ValueError) as err:
        raise ConfigError(f"invalid hf-normalign settings: {err}") from err
    return None


def _checkpoint_config(source: str) -> NormAlignConfig | None:
    """The settings of an aligned checkpoint, None for a plain model."""
    try:
        path = cached_file(source, CONFIG_NAME, _raise_exceptions_for_missing_entries=False)
        return None if path is None else CheckpointInfo.from_file(path).config
    except normalign.NormAlignCheckpointError as err:
        raise ConfigError(str(err)) from err
    except OSError as err:
        raise ConfigError(f"model {source!r} not found: {err}") from err


def _resume_checkpoint(training_args: TrainingArguments) -> str | None:
    resume = training_args.resume_from_checkpoint
    if resume is None or str(resume).lower() in ("false", "no", ""):
        return None
    if str(resume).lower() in ("true", "latest", "last"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise ConfigError(f"resume_from_checkpoint={resume}: no checkpoint-* in {training_args.output_dir}")
        return last
    if not os.path.isdir(resume):
        raise ConfigError(f"resume_from_checkpoint {resume} is not a directory")
    return resume


# --- data, model, stages -----------------------------------------------------------------------------------------


def load_dataset(data_args: DataArguments) -> ConversationDataset:
    """LLaVA JSON/JSONL, a ``save_to_disk`` directory, or anything ``datasets.load_dataset`` reads."""
    columns = {
        "image_column": data_args.image_column,
        "conversations_column": data_args.conversations_column,
        "id_column": data_args.id_column,
    }
    options = {"skip_bad_rows": data_args.skip_bad_rows, "verify_images": data_args.verify_images}
    try:
        return _read_dataset(data_args, options, columns)
    except BadRowError:
        raise
    except (OSError, ValueError) as err:  # invalid JSON, not UTF-8, a dict instead of a list, a missing column
        raise ConfigError(f"data_path {data_args.data_path}: {err}") from err


def _read_dataset(data_args: DataArguments, options: dict[str, Any], columns: dict[str, str]) -> ConversationDataset:
    path = data_args.data_path
    if path.endswith((".json", ".jsonl")):
        return LlavaJsonDataset(path, data_args.image_folder, **options, **columns)
    import datasets

    if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "state.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[data_args.dataset_split]
    else:
        ds = datasets.load_dataset(path, split=data_args.dataset_split)
    return from_hf_dataset(ds, image_folder=data_args.image_folder, source=path, **options, **columns)


def load_processor(config: RecipeConfig) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(config.model.processor_name_or_path or config.model.model_name_or_path)


def load_model(config: RecipeConfig) -> torch.nn.Module:
    """Load (4-bit for QLoRA), patch and return the model; an aligned checkpoint comes back patched already.

    A full run that resumes loads the checkpoint's weights here: the Trainer's own resume loads
    ``model.safetensors`` with ``strict=False`` under the current parameter names, while transformers writes
    legacy names for several families (LLaVA: ``multi_modal_projector.*`` for ``model.multi_modal_projector.*``),
    so a trained projector would silently keep its initial values.
    """
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": DTYPES[config.model.dtype]}
    if config.model.qlora:
        kwargs["quantization_config"] = bnb_config(4, config.model.model_name_or_path)
        if config.model.dtype == "auto":
            kwargs["dtype"] = torch.bfloat16
    with _whole_under_zero3(config.training):
        model = AutoModelForImageTextToText.from_pretrained(config.model_source, **kwargs)
    if config.model_source != config.model.model_name_or_path:  # record the model, not the checkpoint, as base
        model.name_or_path = model.config._name_or_path = config.model.model_name_or_path
    if config.normalign_config is not None:
        normalign.patch(model, config.normalign_config)
    return model


@contextmanager
def _whole_under_zero3(training_args: TrainingArguments) -> Iterator[None]:
    """Honour accelerate's ``zero3_init_flag: false``: load the model whole, so that it can be patched.

    Under ``accelerate launch`` with DeepSpeed, TrainingArguments registers transformers' ZeRO-3 config whatever
    the flag says, and ``from_pretrained`` then builds the model partitioned under ``deepspeed.zero.Init``
    (empty placeholders, which ``normalign.patch`` refuses); accelerate's ``zero3_init_context_manager(False)``
    does nothing when the flag is already false. The config is put back afterwards for the Trainer's engine.
    """
    plugin = training_args.deepspeed_plugin
    if plugin is None or plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def projector_paths(model: torch.nn.Module) -> list[str]:
    """The projector and any extra projectors (Qwen3-VL's deepstack mergers): what stage 1 trains besides the
    plugin."""
    spec = get_spec(model)
    return [spec.projector, *spec.extra_projectors]


def setup_stage(model: torch.nn.Module, config: RecipeConfig) -> torch.nn.Module:
    """Freeze per stage; wrap with LoRA / QLoRA for stage 2. Returns the model to train.

    Stage 1: projector(s) and plugin. Stage 2 full: everything but the vision tower (LLM, ``lm_head``,
    projector, glue such as LLaVA-NeXT's ``image_newline``) and the plugin. Stage 2 LoRA / QLoRA: LoRA on the
    LLM's decoder Linears, projector(s) and plugin.
    """
    peft = config.model.lora or config.model.qlora
    spec = get_spec(model)
    if config.model.qlora:
        model = prepare_for_kbit_training(
            model,
            use_gradient_checkpointing=config.training.gradient_checkpointing,
            gradient_checkpointing_kwargs=config.training.gradient_checkpointing_kwargs,
        )
    if peft:
        from peft import LoraConfig, get_peft_model

        if config.training.gradient_checkpointing and not config.model.qlora:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed layers need an input with grad
        model = get_peft_model(model, LoraConfig(**_lora_kwargs(model, config.model)))
        if not config.baseline:
            mark_plugin_trainable(model)
    base = model.get_base_model() if peft else model
    if not peft:
        base.requires_grad_(config.stage == 2)
        spec.get(base, spec.vision_tower).requires_grad_(False)
    # After the vision tower: Qwen-VL's projector (model.visual.merger) lives inside it.
    for path in projector_paths(base):
        base.get_submodule(path).requires_grad_(True)
    if not config.baseline:
        get_plugin(base).requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    what = "projector and plugin" if config.stage == 1 else "LoRA, projector and plugin" if peft else "all but vision"
    logger.info(f"stage {config.stage}: training {trainable:,} of {total:,} parameters ({what})")
    return model


def _lora_kwargs(model: torch.nn.Module, model_args: ModelArguments) -> dict[str, Any]:
    spec = get_spec(model)
    names = "|".join(re.escape(n.strip()) for n in model_args.lora_target_modules.split(",") if n.strip())
    # A regex limited to the LLM's decoder layers: bare names would also match the vision tower's q_proj etc.
    target = rf"{re.escape(spec.language_model)}\.{spec.layers_attr}\.\d+\..*\b({names})"
    return {
        "r": model_args.lora_r,
        "lora_alpha": model_args.lora_alpha,
        "lora_dropout": model_args.lora_dropout,
        "target_modules": target,
    }


class _PluginCheckpointCallback(TrainerCallback):
    """PEFT checkpoints hold the adapter only: add the plugin and projector (hf-normalign adapter files), which
    the Trainer's resume then restores (hf_normalign.persistence wraps ``Trainer._load_from_checkpoint``)."""

    def __init__(self, base_model_name_or_path: str) -> None:
        self.base_model_name_or_path = base_model_name_or_path

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            _save_plugin_adapter(model, checkpoint, self.base_model_name_or_path)


def _save_plugin_adapter(model: torch.nn.Module, directory: str, base_model_name_or_path: str) -> None:
    if os.path.isdir(base_model_name_or_path):  # a relative path would only resolve from this working directory
        base_model_name_or_path = os.path.abspath(base_model_name_or_path)
    normalign.save_pretrained(
        model, directory, adapter_only=True, include=("projector",), base_model_name_or_path=base_model_name_or_path
    )


# --- running -----------------------------------------------------------------------------------------------------


def build_trainer(config: RecipeConfig) -> Trainer:
    """Load data, processor and model, set up the stage, and return the Trainer (nothing written yet)."""
    train_dataset = load_dataset(config.data)
    processor = load_processor(config)
    collator = VLMDataCollator(processor, max_length=config.data.max_length, template=config.data.chat_template)
    # Seed before the plugin and LoRA are initialised, so runs are reproducible (the Trainer seeds again later).
    set_seed(config.training.seed)
    model = setup_stage(load_model(config), config)
    # The baseline trains the unpatched model, which NormAlignCallback refuses (it would have nothing to do).
    callbacks: list[TrainerCallback] = [] if config.baseline else [normalign.NormAlignCallback()]
    if config.model.lora or config.model.qlora:
        callbacks.append(_PluginCheckpointCallback(config.model.model_name_or_path))
    if config.recipe.mir_every:
        from hf_normalign.callbacks import MIRCallback

        callbacks.append(
            MIRCallback(processor, every_n_steps=config.recipe.mir_every, num_samples=config.recipe.mir_samples)
        )
    return Trainer(
        model=model,
        args=config.training,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
    )


def run(config: RecipeConfig) -> Trainer:
    """Train, save the final checkpoint to ``output_dir`` (and push it); return the Trainer.

    The output is an aligned checkpoint (``normalign.from_pretrained(output_dir)``) with the processor; for
    ``--lora`` the adapter is merged first. ``--qlora`` writes the PEFT adapter and the hf-normalign adapter
    (plugin + projector) side by side: ``normalign.from_pretrained(output_dir)`` loads the base with them, and
    ``peft.PeftModel.from_pretrained(model, output_dir)`` adds the LoRA weights.
    """
    trainer = build_trainer(config)
    if config.recipe.overwrite_output_dir and config.resume_from_checkpoint is None and trainer.args.should_save:
        _remove_earlier_checkpoints(config.training.output_dir)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    output_dir = config.training.output_dir
    if config.model.lora:
        merged = trainer.model.merge_and_unload()
        if trainer.args.should_save:
            merged.save_pretrained(output_dir)
            trainer.processing_class.save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)
        if config.model.qlora and not config.baseline and trainer.args.should_save:
            _save_plugin_adapter(trainer.model, output_dir, config.model.model_name_or_path)
    if config.push_to_hub and trainer.args.should_save:
        # The latest MIR measured by MIRCallback (its `results`), for the model card.
        mir = next((c.results[-1][1] for c in trainer.callback_handler.callbacks if getattr(c, "results", None)), None)
        normalign.push_to_hub(
            output_dir,
            config.push_to_hub,
            private=config.training.hub_private_repo,
            token=config.training.hub_token,
            mir=mir,
        )
    return trainer


def _setup_logging(training_args: TrainingArguments) -> None:
    """Script-style logging: hf-normalign's INFO messages (trained parameters, skipped rows) on the main process."""
    package = std_logging.getLogger("hf_normalign")
    if not package.handlers:
        handler = std_logging.StreamHandler(sys.stderr)
        handler.setFormatter(std_logging.Formatter("[%(name)s] %(message)s"))
        package.addHandler(handler)
    package.setLevel(std_logging.INFO if training_args.should_log else std_logging.WARNING)


def finish(trainer: Trainer) -> None:
    """End a script's run: wait for every process, then close the process group.

    Under ``accelerate launch`` the main process still saves (and pushes) after the others are done; a process
    that exits while the group is open aborts in gloo's/NCCL's teardown ("terminate called without an active
    exception") and fails the launch. A single process has no group, and this does nothing."""
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def main(argv: Sequence[str] | None = None, *, stage: int) -> int:
    """Command-line entry: 0 on success, 2 for a configuration or data error (reported on one line)."""
    prog = f"hf_normalign.recipes.stage{stage}"
    try:
        config = parse_args(argv, stage)
        _setup_logging(config.training)
        finish(run(config))
    except (ConfigError, BadRowError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
