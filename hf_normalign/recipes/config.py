"""The recipe's configuration: ``--config`` YAML + command line parsed into a validated :class:`RecipeConfig`.

Every key is a field of :class:`ModelArguments`, :class:`DataArguments`, :class:`RecipeArguments` (see
:mod:`hf_normalign.recipes.arguments`) or ``transformers.TrainingArguments`` (``--learning_rate`` /
``--learning-rate`` on the command line, ``learning_rate:`` in YAML), plus ``--push-to-hub REPO``
(``push_to_hub: REPO`` in YAML) and a YAML ``build:`` section. Defaults: the stage's (:data:`STAGE_DEFAULTS`),
then the YAML, then the command line. Parsing validates and writes nothing: a ``build:`` section is checked here
and built when the Trainer is set up (:func:`hf_normalign.recipes.train.build_trainer`), after the data.

Usage::

    from hf_normalign.recipes.config import ConfigError, parse_args
    config = parse_args(["--config", "tiny_stage1", "--output_dir", "out/s1"], stage=1)  # raises ConfigError
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils.hub import cached_file

import hf_normalign as normalign
from hf_normalign import build
from hf_normalign.config import METHODS, NormAlignConfig
from hf_normalign.persistence import CONFIG_NAME, CheckpointInfo
from hf_normalign.recipes import arguments
from hf_normalign.recipes.arguments import (
    COMMON_DEFAULTS,
    DTYPE_NAMES,
    STAGE_DEFAULTS,
    DataArguments,
    ModelArguments,
    RecipeArguments,
)

__all__ = ["CONFIG_DIR", "ConfigError", "RecipeConfig", "earlier_run", "parse_args"]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


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
    # The YAML's checked `build:` section when the model is built from it (`hf_normalign.build.materialize`, run
    # when the Trainer is set up; its save_dir is model_name_or_path); None otherwise.
    build: dict[str, Any] | None = None


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
    values.pop("build", None)  # checked by _build_section
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
    """Parse ``--config`` YAML + command line into a validated :class:`RecipeConfig` (raises :class:`ConfigError`).

    Nothing is written: a ``build:`` section is only checked here (its model is built by ``build_trainer``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --help-training: the full help, TrainingArguments included (--help of the entry points is arguments.help_text)
    argv = ["--help" if arg == arguments.TRAINING_HELP_FLAG else arg for arg in argv]
    # `--push-to-hub REPO` names a repo, unlike TrainingArguments' boolean of the same name: take it first.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--push-to-hub", "--push_to_hub", dest="push_to_hub", metavar="REPO")
    known, rest = pre.parse_known_args(argv)
    parser = _parser(stage)
    hub, section = None, None
    if known.config:
        path = _resolve_config_path(known.config)
        values, hub = _yaml_defaults(path, parser)
        section = _build_section(path)
        parser.set_defaults(**values, **({} if section is None else {"model_name_or_path": section["save_dir"]}))
    namespace = parser.parse_args(rest)  # usage errors exit with status 2, as argparse does
    given = vars(namespace)
    try:
        model_args, data_args, recipe_args, training_args = (
            cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.init}) for cls in _DATACLASSES
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    # A model named on the command line replaces the build: nothing to build then.
    if section is not None and model_args.model_name_or_path != section["save_dir"]:
        section = None
    return _validate(stage, model_args, data_args, recipe_args, training_args, given, known.push_to_hub or hub, section)


def _build_section(path: str) -> dict[str, Any] | None:
    """The YAML's ``build:`` section (a VLM from a vision encoder + an LLM, see hf_normalign.build.materialize),
    checked; its ``save_dir`` is the ``model_name_or_path`` default. Nothing is built here."""
    with open(path, encoding="utf-8") as f:
        section = (yaml.safe_load(f) or {}).get("build")
    if section is None:
        return None
    try:
        save_dir = build.check_section(section)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: build: {err}") from err
    return {**section, "save_dir": str(save_dir)}


def _validate(
    stage: int,
    model_args: ModelArguments,
    data_args: DataArguments,
    recipe_args: RecipeArguments,
    training_args: TrainingArguments,
    given: dict[str, Any],
    hub: str | None,
    build_section: dict[str, Any] | None,
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
    if model_args.dtype not in DTYPE_NAMES:
        raise ConfigError(f"--dtype must be one of {list(DTYPE_NAMES)}, got {model_args.dtype!r}")
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
    # A model still to be built is a plain one; one built by an earlier run is read like any other.
    unbuilt = build_section is not None and not os.path.isdir(build_section["save_dir"])
    checkpoint_config = None if unbuilt else _checkpoint_config(model_args.model_name_or_path)
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
        build=build_section,
    )


def earlier_run(output_dir: str) -> list[str]:
    """What marks ``output_dir`` as holding an earlier run: its checkpoints and final-save files."""
    if not os.path.isdir(output_dir):
        return []
    marks = {CONFIG_NAME, "trainer_state.json", "config.json", "adapter_config.json"}
    return sorted(e for e in os.listdir(output_dir) if e.startswith(PREFIX_CHECKPOINT_DIR) or e in marks)


def _check_output_dir(output_dir: str, resume: str | None, overwrite: bool) -> None:
    found = earlier_run(output_dir)
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
