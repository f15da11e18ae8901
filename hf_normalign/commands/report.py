"""``normalign report MODEL [--compare MODEL2 ...] --out DIR`` (options and usage checks in :mod:`hf_normalign.cli`):
load every model, run :func:`hf_normalign.diagnostics.build_report` and print each model's summary.

Example:
    $ normalign report aligned --compare llava-hf/llava-1.5-7b-hf --out report/
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..console import emit


def _names(paths: Sequence[str]) -> list[str]:
    """Short, unique display names: the last path component, numbered when two agree."""
    base = [Path(p.rstrip("/\\")).name or p for p in paths]
    return [f"{b} ({i + 1})" if base.count(b) > 1 else b for i, b in enumerate(base)]


def _load(source: str, device: str, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # `import hf_normalign` has installed the transformers integration: aligned checkpoints load patched.
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, device_map=device)
    return model, AutoProcessor.from_pretrained(source)


def run(args: argparse.Namespace) -> int:
    """Write the report of ``args.model`` (and ``args.compare``) into ``args.out``; print the summaries."""
    import torch

    from ..diagnostics import build_report, load_probe

    sources = [args.model, *args.compare]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    probe = None
    if args.images is not None:
        probe = load_probe(args.images, args.texts, num_samples=args.num_samples, seed=args.seed)
    models = {name: _load(src, device, args.dtype) for name, src in zip(_names(sources), sources, strict=True)}
    report = build_report(
        models,
        args.out,
        probe,
        metrics=args.metrics,
        num_samples=args.num_samples,
        degradation_samples=args.degradation_samples,
        batch_size=args.batch_size,
        key_layers=args.key_layers,
        max_key_samples=args.max_key_samples,
        seed=args.seed,
        title=args.title,
        progress=not args.no_progress,
    )
    for line in report.summary_lines():
        emit(line)
    emit(f"wrote {report.html}, {report.json} and {len(report.plots)} plots")
    return 0
