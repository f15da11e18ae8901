"""Stage 1, alignment: vision tower and LLM frozen; projector (+ Qwen3-VL deepstack mergers) and the hf-normalign
plugin trained (defaults: lr 1e-3, warmup 3%, cosine).

Usage::

    python -m hf_normalign.recipes.stage1 --config llava_stage1 --model_name_or_path MODEL --output_dir OUT
    accelerate launch --config_file hf_normalign/recipes/accelerate/ddp.yaml -m hf_normalign.recipes.stage1 --config ...

Options: ``--help`` (the recipe's own, without importing torch; ``--help-training`` adds TrainingArguments'); configs
and data formats: docs/recipes.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from hf_normalign.recipes.entry import run_stage


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(argv, stage=1)


if __name__ == "__main__":
    raise SystemExit(main())
