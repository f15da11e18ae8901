"""The recipes' own options (the dataclasses behind ``--config`` YAML and the command line) and their ``--help``.

This module imports neither torch nor transformers: ``normalign-stage1 --help`` / ``normalign-stage2 --help`` print
:func:`help_text` without loading them (well under a second), like ``normalign --help``. The recipes also take
every ``transformers.TrainingArguments`` option; ``--help-training`` lists those (it imports transformers).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hf_normalign.config import METHODS

# Defaults per stage (LLaVA-1.5 practice): 1 = alignment, 2 = instruction tuning. YAML and CLI override them.
STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    # Stage 1: with an image in every batch, every trained parameter gets a gradient at every step, so DDP need
    # not search for unused parameters (text-only rows: pass --ddp_find_unused_parameters true).
    1: {
        "learning_rate": 1e-3,
        "warmup_steps": 0.03,
        "lr_scheduler_type": "cosine",
        "weight_decay": 0.0,
        "ddp_find_unused_parameters": False,
    },
    2: {"learning_rate": 2e-5, "warmup_steps": 0.03, "lr_scheduler_type": "cosine", "weight_decay": 0.0},
}
# Our dataset is a torch Dataset of raw conversations: the Trainer must not drop its "unused" columns.
COMMON_DEFAULTS: dict[str, Any] = {"remove_unused_columns": False}
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # model_setup.DTYPES maps them to torch dtypes


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "base VLM (directory or Hub id), or an aligned checkpoint (e.g. the stage-1 output)"},
    )
    processor_name_or_path: str | None = field(default=None, metadata={"help": "default: model_name_or_path"})
    methods: str | None = field(
        default=None,
        metadata={
            "help": f"comma-separated methods ({','.join(METHODS)}), or 'none' for the papers' baseline (the same "
            "recipe without any intervention); not needed for an aligned checkpoint"
        },
    )
    normalign_config: str | None = field(
        default=None,
        metadata={"help": "NormAlignConfig as JSON text or a .json file (a mapping in YAML); instead of --methods"},
    )
    dtype: str = field(default="auto", metadata={"help": f"weights dtype on load: {', '.join(DTYPE_NAMES)}"})
    lora: bool = field(default=False, metadata={"help": "stage 2: LoRA on the LLM instead of full fine-tuning"})
    qlora: bool = field(default=False, metadata={"help": "stage 2: LoRA on a 4-bit LLM (bitsandbytes)"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "comma-separated Linear names inside the LLM decoder layers"},
    )


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None,
        metadata={"help": "LLaVA JSON/JSONL file, a datasets.save_to_disk directory, or a datasets name/path"},
    )
    image_folder: str | None = field(default=None, metadata={"help": "base of relative image paths"})
    dataset_split: str = "train"
    image_column: str = "image"
    conversations_column: str = "conversations"
    id_column: str = "id"
    skip_bad_rows: bool = field(default=False, metadata={"help": "skip (and count) bad rows instead of failing"})
    verify_images: bool = field(default=True, metadata={"help": "decode every image while validating the data"})
    max_length: int | None = field(default=None, metadata={"help": "cut longer rows (never through image tokens)"})
    chat_template: str = field(default="auto", metadata={"help": "auto (processor/tokenizer template) or plain"})


@dataclass
class RecipeArguments:
    mir_every: int = field(default=0, metadata={"help": "log MIR every N optimizer steps (0: off)"})
    mir_samples: int = field(default=100, metadata={"help": "probe samples for MIR"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "train into an output_dir that holds an earlier run, deleting its checkpoint-* folders"},
    )


RECIPE_DATACLASSES = (ModelArguments, DataArguments, RecipeArguments)
HELP_FLAGS = ("-h", "--help")
TRAINING_HELP_FLAG = "--help-training"
_STAGE_NAMES = {1: "alignment", 2: "instruction tuning"}


def prog(stage: int) -> str:
    return f"python -m hf_normalign.recipes.stage{stage}"


def description(stage: int) -> str:
    return f"Stage {stage} ({_STAGE_NAMES[stage]}) of an aligned VLM (also the normalign-stage{stage} command)."


def help_text(stage: int) -> str:
    """``--help``: the recipe's own options with their defaults, the stage's training defaults, and where the
    ``TrainingArguments`` options are listed."""
    parser = argparse.ArgumentParser(
        prog=prog(stage),
        description=description(stage),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Also every transformers.TrainingArguments option (--output_dir, --learning_rate, --num_train_epochs, "
        "--per_device_train_batch_size, --gradient_accumulation_steps, --bf16, ...): "
        f"{TRAINING_HELP_FLAG} lists them all.\nDefaults of stage {stage}: "
        + ", ".join(f"{k} {v}" for k, v in {**COMMON_DEFAULTS, **STAGE_DEFAULTS[stage]}.items())
        + ". Configs and data formats: docs/recipes.md.",
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="defaults for any option (packaged: e.g. llava_stage1)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the final checkpoint with normalign.push_to_hub")
    for cls in RECIPE_DATACLASSES:
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = f.metadata.get("help", "")
            group.add_argument(f"--{f.name}", metavar=f.name.upper(), help=f"{shown} (default: {default})".lstrip())
    return parser.format_help()


def print_help_if_asked(argv: Sequence[str], stage: int) -> bool:
    """Print :func:`help_text` for ``-h`` / ``--help`` in ``argv`` and return True (``--help-training`` is left to
    the full parser, which needs transformers)."""
    if TRAINING_HELP_FLAG in argv or not any(arg in HELP_FLAGS for arg in argv):
        return False
    print(help_text(stage), end="")
    return True
