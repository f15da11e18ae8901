"""``normalign patch`` (options in :mod:`hf_normalign.cli`): load a model, patch it, save the aligned checkpoint."""

from __future__ import annotations

import argparse

import torch
from transformers.utils import logging

from ..config import NormAlignConfig
from ..console import emit
from ..patching import patch
from ..persistence import autoload, save_pretrained

logger = logging.get_logger(__name__)


def run(args: argparse.Namespace) -> int:
    """``normalign patch`` (options in hf_normalign.cli): load, patch and save."""
    config = args.methods or args.config
    saved = _patch_and_save(args, config)
    emit(f"Saved {saved} ({', '.join(config.methods)}) to {args.out}")
    return 0


def _patch_and_save(args: argparse.Namespace, config: NormAlignConfig) -> str:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)  # one of cli.DTYPES
    with autoload(False):
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, revision=args.revision)
    patch(model, config)
    if args.adapter_only:
        include = [entry.strip() for entry in args.include.split(",") if entry.strip()]
        save_pretrained(model, args.out, adapter_only=True, include=include, base_model_revision=args.revision)
        return "adapter"
    model.save_pretrained(args.out)
    try:  # a processor beside the weights makes the checkpoint usable on its own
        AutoProcessor.from_pretrained(args.model, revision=args.revision).save_pretrained(args.out)
    except (OSError, ValueError, TypeError, KeyError) as err:
        logger.warning(f"No processor saved to {args.out}: none loads from {args.model} ({err}).")
    return "aligned checkpoint"
