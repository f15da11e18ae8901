"""The stage entry points' shared body: the light ``--help`` first (no torch), then the recipe."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .arguments import print_help_if_asked


def run_stage(argv: Sequence[str] | None, stage: int) -> int:
    """Run stage ``stage`` on ``argv`` (default ``sys.argv[1:]``); ``--help`` answers without importing torch."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if print_help_if_asked(argv, stage):
        return 0
    from . import train  # torch and transformers load here, after the help check

    return train.main(argv, stage=stage)
