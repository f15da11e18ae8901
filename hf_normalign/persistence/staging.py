"""Crash-safe writes: a save goes to a hidden staging folder, is committed by one atomic rename, then rolled
forward into the target; a single file (a report, a JSON result) goes through :func:`write_file_atomically`.

A save writes everything into a hidden staging folder beside the target, then writes a commit marker into it
(atomically: a temporary file renamed), then moves each new file over the old one (os.replace, atomic per file)
and removes the old files the new save replaces (stale shards, plugin files it no longer writes). Files of the
target that the save does not write (processor, tokenizer, trainer state, notes) are never moved. The next save
or load of the folder finishes a committed save (:func:`recover`) and removes an uncommitted staging folder,
which holds only files of the interrupted save.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from transformers.utils import logging

logger = logging.get_logger(__name__)

COMMIT_NAME = ".normalign-commit.json"

_STAGING = ".normalign-staging-"

_on_file_operation: Callable[[str, str], None] | None = None


def write_file_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Write one file so that a reader, or a killed process, sees its old content or the new one, never a part:
    the data goes to ``<path>.partial`` beside it, is flushed to disk, then renamed over ``path``.

    Example:
        >>> write_file_atomically("report.json", "{}\n")  # doctest: +SKIP
    """
    partial = f"{os.fspath(path)}.partial"
    with open(partial, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def file_operation(operation: str, path: str) -> None:
    if _on_file_operation is not None:
        _on_file_operation(operation, path)


def _staging_folders(target: str) -> list[str]:
    parent, name = os.path.split(target)
    prefix = f".{name}{_STAGING}"
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return []
    return sorted(os.path.join(parent, e) for e in entries if e.startswith(prefix))


def recover(directory: str | os.PathLike) -> None:
    """Finish or clean up an interrupted save of ``directory`` (called by every save and local load).

    A committed save (its staging folder holds the commit marker) is completed; an uncommitted staging folder
    holds only the interrupted save's own files and is removed, with a warning.

    Example:
        >>> normalign.persistence.recover("out/aligned")   # doctest: +SKIP
    """
    target = os.path.realpath(os.fspath(directory))
    for staging in _staging_folders(target):
        marker = os.path.join(staging, COMMIT_NAME)
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as f:
                plan = json.load(f)
            _apply(staging, target, plan["moves"], plan["removes"])
        else:
            logger.warning(f"Removing {staging}: the unfinished files of an interrupted save of {target}.")
            file_operation("rmtree", staging)
            shutil.rmtree(staging, ignore_errors=True)


def _apply(staging: str, target: str, moves: list[str], removes: list[str]) -> None:
    """Roll a committed save forward; every step may be repeated after a kill."""
    if not os.path.isdir(target):
        file_operation("mkdir", target)
        os.makedirs(target, exist_ok=True)
    for entry in moves:
        source = os.path.join(staging, entry)
        if os.path.lexists(source):
            file_operation("replace", source)
            os.replace(source, os.path.join(target, entry))
    for entry in removes:
        path = os.path.join(target, entry)
        if os.path.lexists(path):
            file_operation("remove", path)
            os.remove(path)
    file_operation("remove", os.path.join(staging, COMMIT_NAME))
    os.remove(os.path.join(staging, COMMIT_NAME))
    file_operation("rmdir", staging)
    os.rmdir(staging)


@contextmanager
def atomic_directory(target: str | os.PathLike, replaces: Callable[[str], bool]) -> Iterator[str]:
    """Yield an empty staging folder beside ``target``; on success its files replace those of ``target``.

    Entries of ``target`` that the new save did not write stay, except those for which ``replaces(name)`` is
    true (files of the previous save that the new one supersedes). A failure before the commit removes the
    staging folder and leaves ``target`` as it was.
    """
    target = os.path.realpath(os.fspath(target))  # a symlinked checkpoint dir: replace what it points at
    recover(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}{_STAGING}{uuid.uuid4().hex[:8]}")
    file_operation("mkdir", staging)
    os.mkdir(staging)
    try:
        yield staging
        written = sorted(os.listdir(staging))
        nested = [e for e in written if os.path.isdir(os.path.join(staging, e))]
        if nested:
            raise RuntimeError(f"hf-normalign saves files only; the save wrote the folders {nested} into {staging}.")
        old = os.listdir(target) if os.path.isdir(target) else []
        removes = sorted(e for e in old if e not in written and replaces(e) and os.path.isfile(os.path.join(target, e)))
        temporary = os.path.join(staging, f"{COMMIT_NAME}.tmp")
        file_operation("write", temporary)
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump({"moves": written, "removes": removes}, f)
        file_operation("replace", temporary)
        os.replace(temporary, os.path.join(staging, COMMIT_NAME))  # the commit point
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _apply(staging, target, written, removes)
