"""The 100 news-like passages shipped with the project (``probe_data/passages.txt``; fictional places and people,
written for it): the texts of the default probe, and the words its drawn documents show.

Example:
    >>> len(default_passages())
    100
"""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["default_passages"]


@cache
def default_passages() -> tuple[str, ...]:
    """The 100 news-like passages shipped with the project (fictional, written for it)."""
    text = resources.files("hf_normalign.diagnostics").joinpath("probe_data/passages.txt").read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())
