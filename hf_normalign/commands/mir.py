"""``normalign mir MODEL ...`` (options in :mod:`hf_normalign.cli`): load a model from the Hub or a folder, run
:func:`hf_normalign.diagnostics.mir` on it (on every process of an ``accelerate launch``) and print the result.

Example:
    $ normalign mir llava-hf/llava-1.5-7b-hf --preset reference --num-samples 50 --json mir.json
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..console import emit


def _launched_accelerator(device: str) -> Any:
    """The ``accelerate.Accelerator`` of an ``accelerate launch`` with several processes; None for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if device not in ("cpu", "cuda"):
        raise ValueError(
            f"--device {device}: under accelerate launch each process runs its own copy of the model on its own "
            "device; pass --device cpu or cuda, or leave --device out"
        )
    from accelerate import Accelerator

    return Accelerator(cpu=device == "cpu")


def run(args: argparse.Namespace) -> int:
    """Load ``args.model``, compute its MIR, print it (and write ``--json``) on the main process."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..diagnostics import MIROptions, RunOptions, load_probe, mir
    from ..persistence.staging import write_file_atomically

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = _launched_accelerator(device)
    kwargs: dict[str, Any] = {"dtype": args.dtype, "device_map": device if accelerator is None else accelerator.device}
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    probe = None  # read first: a bad texts file is reported before the model loads
    if args.images is not None:
        probe = load_probe(args.images, args.texts, num_samples=args.num_samples, seed=args.seed)
    model = AutoModelForImageTextToText.from_pretrained(args.model, **kwargs)
    processor = AutoProcessor.from_pretrained(args.model)
    options = MIROptions(
        final_norm=not args.no_final_norm,
        layers=None if args.layers is None else tuple(args.layers),
        include_embeddings=args.include_embeddings,
        outliers=args.outliers,
        outlier_stats=args.outlier_stats,
        text_scale=not args.no_text_scale,
        text_tokens=args.text_tokens,
        preset=args.preset,
        sqrt=args.sqrt,
        log_base=args.log_base,
        streaming=args.streaming,
    )
    run_options = RunOptions(batch_size=args.batch_size, progress=not args.no_progress)
    result = mir(
        model,
        processor,
        probe,
        num_samples=args.num_samples,
        seed=args.seed,
        prompt=args.prompt,
        options=options,
        run=run_options,
        accelerator=accelerator,
    )
    if result is not None:  # the main process
        emit(result)
        if args.json is not None:
            write_file_atomically(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
            emit(f"wrote {args.json}")
    if accelerator is not None:  # leave together: a process exiting with the group open aborts the launch
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return 0
