"""Stage 2, instruction tuning: projector, LLM (full, --lora or --qlora) and the hf-normalign plugin trained
(defaults: lr 2e-5, warmup 3%, cosine); the vision tower stays frozen.

Usage::

    python -m hf_normalign.recipes.stage2 --config llava_stage2 --model_name_or_path MODEL --output_dir OUT
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m hf_normalign.recipes.stage2 --config ...

Options: ``--help``; configs and data formats: docs/recipes.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from hf_normalign.recipes import train


def main(argv: Sequence[str] | None = None) -> int:
    return train.main(argv, stage=2)


if __name__ == "__main__":
    raise SystemExit(main())
