"""``normalign push`` (options in :mod:`hf_normalign.cli`): upload an aligned checkpoint or adapter folder with
:func:`hf_normalign.push_to_hub` and print the commit (or pull request) address."""

from __future__ import annotations

import argparse

from ..console import emit
from ..hub import push_to_hub


def run(args: argparse.Namespace) -> int:
    """Push ``args.directory`` to ``args.repo_id``; ``--adapter-only`` / ``--private`` only ever switch on."""
    commit = push_to_hub(
        args.directory,
        args.repo_id,
        adapter_only=True if args.adapter_only else None,
        private=True if args.private else None,
        token=args.token,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        mir=args.mir,
    )
    emit(commit.pr_url or commit.commit_url)
    return 0
