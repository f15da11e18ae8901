"""The recipe's run, shared by stage 1 and stage 2: set up the Trainer, train, save the final checkpoint (and push
it), end the process group.

A run is: :func:`~hf_normalign.recipes.config.parse_args` (validation; writes nothing), :func:`build_trainer`
(data read and validated whole, then a ``build:`` section's model built, the model loaded and set up per stage),
:func:`run` (training and the final save). Everything is validated, the data included, before anything is
written: a config or data error leaves the output directory (and a ``build:`` section's ``save_dir``) untouched.

Usage::

    python -m hf_normalign.recipes.stage1 --config recipes/configs/llava_stage1.yaml --output_dir out/s1
    accelerate launch --config_file hf_normalign/recipes/accelerate/ddp.yaml -m hf_normalign.recipes.stage1 --config ...

    from hf_normalign.recipes.train import main, parse_args, run
    trainer = run(parse_args(["--config", "cfg.yaml"], stage=1))      # returns the Trainer after training
"""

from __future__ import annotations

import logging as std_logging
import os
import shutil
import sys
from collections.abc import Sequence

from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

import hf_normalign as normalign
from hf_normalign.data import BadRowError, VLMDataCollator
from hf_normalign.recipes.callbacks import latest_mir, recipe_callbacks
from hf_normalign.recipes.config import CONFIG_DIR, ConfigError, RecipeConfig, earlier_run, parse_args
from hf_normalign.recipes.dataset import load_dataset
from hf_normalign.recipes.model_setup import build_base, load_model, load_processor, projector_paths, setup_stage

# parse_args, ConfigError, RecipeConfig, CONFIG_DIR, setup_stage, ... have been importable from here: they stay.
__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "RecipeConfig",
    "build_trainer",
    "finish",
    "load_dataset",
    "load_model",
    "main",
    "parse_args",
    "projector_paths",
    "run",
    "setup_stage",
]

logger = logging.get_logger(__name__)


def build_trainer(config: RecipeConfig) -> Trainer:
    """Load data, build (a ``build:`` section's model), load processor and model, set up the stage, and return the
    Trainer (nothing written but the built model)."""
    train_dataset = load_dataset(config.data)
    build_base(config)  # after the data: a bad row leaves no built model behind
    processor = load_processor(config)
    collator = VLMDataCollator(processor, max_length=config.data.max_length, template=config.data.chat_template)
    # Seed before the plugin and LoRA are initialised, so runs are reproducible (the Trainer seeds again later).
    set_seed(config.training.seed)
    model = setup_stage(load_model(config), config)
    return Trainer(
        model=model,
        args=config.training,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=recipe_callbacks(config, processor),
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
        trainer.save_model(output_dir)  # QLoRA: the adapter, and beside it the plugin and projector
    if config.push_to_hub and trainer.args.should_save:
        normalign.push_to_hub(
            output_dir,
            config.push_to_hub,
            private=config.training.hub_private_repo,
            token=config.training.hub_token,
            mir=latest_mir(trainer),
        )
    return trainer


def _remove_earlier_checkpoints(output_dir: str) -> None:
    """--overwrite_output_dir: drop the earlier run's checkpoint-* folders, so a later resume cannot pick one."""
    for entry in earlier_run(output_dir):
        path = os.path.join(output_dir, entry)
        if entry.startswith(PREFIX_CHECKPOINT_DIR) and os.path.isdir(path):
            logger.warning(f"--overwrite_output_dir: removing {path} of an earlier run")
            shutil.rmtree(path)


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
