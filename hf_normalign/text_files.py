"""Reading the text files a user hands over (probe passages, LLaVA JSON / JSONL records).

UTF-8, with or without a byte-order mark (removed); a file that is not UTF-8 or not valid JSON is refused with an
error naming the file, the line and the fix. Imports nothing from hf-normalign.

Example:
    >>> from hf_normalign.text_files import read_jsonl
    >>> read_jsonl("probe.jsonl")  # doctest: +SKIP
    [(1, {'text': 'A story.'}), (3, {'text': 'Another.'})]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_text(path: str | os.PathLike) -> str:
    """The file's text, decoded as UTF-8 (``utf-8-sig``: a leading byte-order mark is dropped)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{path}, line {line} is not UTF-8 text ({err.reason} at byte {err.start}): save the file as UTF-8"
        ) from err


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value the file holds."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from err


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSON Lines file (one JSON value a line)."""
    rows = []
    # split on "\n" only: str.splitlines would also cut at U+2028, which JSON strings may hold unescaped
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}); a .jsonl file holds one "
                "JSON value a line"
            ) from err
    return rows
