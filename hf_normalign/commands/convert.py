"""``normalign convert`` (options in :mod:`hf_normalign.cli`): an original-format LLaVA-1.5 checkpoint to an
aligned (or, without MoCa, plain) transformers checkpoint."""

from __future__ import annotations

import argparse

from ..convert.llava_original import convert


def run(args: argparse.Namespace) -> int:
    """Convert ``args.source`` into ``args.out`` and say what was written."""
    result = convert(args.source, args.out, vision_tower=args.vision_tower, revision=args.revision)
    if result.moca_layers:
        what = f"an aligned checkpoint with MoCa on layers {list(result.moca_layers)}"
        load = f"hf_normalign.from_pretrained({str(result.out)!r})"
    else:
        what = "a plain transformers checkpoint (no MoCa in the source)"
        load = f"LlavaForConditionalGeneration.from_pretrained({str(result.out)!r})"
    print(
        f"Wrote {what} to {result.out} (<image> = {result.image_token_id}, <pad> = {result.pad_token_id}); load it "
        f"with {load}"
    )
    return 0
