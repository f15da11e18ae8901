"""Stage 2, instruction tuning: projector, LLM (full, --lora or --qlora) and the hf-normalign plugin trained
(defaults: lr 2e-5, warmup 3%, cosine); the vision tower stays frozen.

Usage::

    python -m hf_normalign.recipes.stage2 --config llava_stage2 --model_name_or_path MODEL --output_dir OUT
    accelerate launch --config_file hf_normalign/recipes/accelerate/ddp.yaml -m hf_normalign.recipes.stage2 --config ...

Options: ``--help`` (the recipe's own, without importing torch; ``--help-training`` adds TrainingArguments'); configs
and data formats: docs/recipes.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from hf_normalign.recipes.entry import run_stage


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(argv, stage=2)


if __name__ == "__main__":
    raise SystemExit(main())
