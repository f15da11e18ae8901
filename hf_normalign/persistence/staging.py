"""Crash-safe, serialised writes of a checkpoint folder, and consistent reads of it; a single file (a report, a
JSON result) goes through :func:`write_file_atomically`.

A save holds the folder's writer lock (``.NAME.normalign-lock`` beside the folder) from start to end. It writes
everything into a hidden staging folder beside the target, then writes a commit marker into it (atomically: a
temporary file renamed), then moves each new file over the old one (os.replace, atomic per file) and removes the
old files the new save replaces (stale shards, plugin files it no longer writes). Files of the target that the save
does not write (processor, tokenizer, trainer state, notes) are never moved. The next save (or :func:`recover`)
finishes a committed save and removes an uncommitted staging folder, which holds only files of the interrupted save;
both act only on a plan that passes :func:`_read_plan`'s checks, never on what a folder merely claims.

Readers never write: :func:`read_consistently` waits for a save that is rolling forward, refuses a folder whose
save was interrupted after its commit, and repeats a read during which the folder changed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from filelock import FileLock, Timeout
from transformers.utils import logging

from .format import NormAlignCheckpointError

logger = logging.get_logger(__name__)

COMMIT_NAME = ".normalign-commit.json"

LOCK_TIMEOUT_ENV = "HF_NORMALIGN_LOCK_TIMEOUT"

_DEFAULT_LOCK_TIMEOUT = 600.0

_STAGING = ".normalign-staging-"

_LOCK = ".normalign-lock"

_MAX_PLAN_BYTES = 1 << 20  # a plan lists file names; anything larger was not written by a save

_READ_ATTEMPTS = 3

_POLL_SECONDS = 0.05

_on_file_operation: Callable[[str, str], None] | None = None

_held = threading.local()  # the folders whose writer lock this thread holds (a nested save must not wait on itself)

T = TypeVar("T")


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


# --- the writer lock ---------------------------------------------------------------------------------------------


def lock_path(target: str) -> str:
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}{_LOCK}")


def lock_timeout() -> float:
    """Seconds a save waits for another save of the same folder (``HF_NORMALIGN_LOCK_TIMEOUT``, default 600)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    if raw is None:
        return _DEFAULT_LOCK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds >= 0, got {raw!r}.")
    return value


@contextmanager
def writer_lock(directory: str | os.PathLike) -> Iterator[str]:
    """Hold the writer lock of a checkpoint folder; yields the folder's resolved path. Saves of one folder, from any
    process or thread, run one after the other; one that waits longer than :func:`lock_timeout` fails."""
    target = os.path.realpath(os.fspath(directory))
    held = getattr(_held, "folders", None)
    if held is None:
        held = _held.folders = set()
    if target in held:
        yield target
        return
    timeout = lock_timeout()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    lock = FileLock(lock_path(target), timeout=timeout)
    try:
        lock.acquire()
    except Timeout as err:
        raise TimeoutError(
            f"Another process has been saving into {target} for over {timeout:g} s (it holds the lock "
            f"{lock_path(target)}), so this save did not start. Wait for that save to finish, save elsewhere, or "
            f"raise the wait with {LOCK_TIMEOUT_ENV}=<seconds>."
        ) from err
    held.add(target)
    try:
        yield target
    finally:
        held.discard(target)
        lock.release()


# --- plans: what recovery may act on -----------------------------------------------------------------------------


def _staging_folders(target: str) -> list[str]:
    parent, name = os.path.split(target)
    pattern = re.compile(re.escape(f".{name}{_STAGING}") + r"[0-9a-f]{8}")
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, e) for e in entries if pattern.fullmatch(e))


def _invalid(staging: str, target: str, reason: str) -> NormAlignCheckpointError:
    return NormAlignCheckpointError(
        f"{staging} (beside {target}) is not a staging folder hf-normalign can act on: {reason}. Nothing was moved "
        "or deleted. It is not part of the checkpoint: inspect it and remove it by hand. If it held an interrupted "
        f"save of yours, {target} may hold part of that save: save the model into it again."
    )


def _is_regular(path: str) -> bool:
    """A regular file, not a symbolic link (lstat), or nothing at all."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return True
    return stat.S_ISREG(mode)


def _check_name(entry: object) -> str | None:
    """Why ``entry`` is not a plain file name in one folder (None when it is)."""
    if not isinstance(entry, str):
        return f"{entry!r} is not a string"
    separators = {"/", "\\", os.sep, os.altsep or "/", "\0"}
    if entry in ("", ".", "..") or any(s in entry for s in separators) or os.path.isabs(entry):
        return f"{entry!r} is not a plain file name (absolute paths, '..' and sub-folders are refused)"
    if entry.startswith(COMMIT_NAME):
        return f"{entry!r} names the commit marker"
    return None


def _check_inside(folder: str, entry: str) -> str | None:
    """Why ``folder/entry`` may not be replaced or deleted (None when it may): it must resolve inside ``folder``
    and be a regular file, or not exist."""
    path = os.path.join(folder, entry)
    if os.path.realpath(path) != os.path.join(os.path.realpath(folder), entry):
        return f"{path} resolves outside {folder} (a symbolic link)"
    if not _is_regular(path):
        return f"{path} is not a regular file"
    return None


def _read_plan(staging: str, target: str) -> tuple[list[str], list[str]]:
    """The (moves, removes) of a committed staging folder, or an error: a plan names only plain files of the staging
    folder and of the target, each a regular file resolving inside its folder, and the staging folder holds nothing
    else."""
    marker = os.path.join(staging, COMMIT_NAME)
    if not _is_regular(marker) or os.lstat(marker).st_size > _MAX_PLAN_BYTES:
        raise _invalid(staging, target, f"its commit marker {COMMIT_NAME} is not a regular file of at most 1 MiB")
    try:
        with open(marker, encoding="utf-8") as f:
            plan = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _invalid(staging, target, f"its commit marker is damaged ({err})") from err
    if not (
        isinstance(plan, dict)
        and set(plan) == {"moves", "removes"}
        and all(isinstance(plan[key], list) for key in plan)
    ):
        raise _invalid(staging, target, 'its commit marker is not {"moves": [...], "removes": [...]}')
    moves, removes = plan["moves"], plan["removes"]
    problems = [_check_name(entry) for entry in moves + removes]
    if not any(problems):
        if len(set(moves + removes)) != len(moves) + len(removes):
            problems.append("an entry is listed twice")
        problems += [_check_inside(staging, e) or _check_inside(target, e) for e in moves]
        problems += [_check_inside(target, e) for e in removes]
        extra = sorted(set(os.listdir(staging)) - set(moves) - {COMMIT_NAME})
        if extra:
            problems.append(f"it holds {extra}, which its plan does not list")
    problems = [p for p in problems if p]
    if problems:
        raise _invalid(staging, target, "; ".join(problems[:3]))
    return moves, removes


def _discard_uncommitted(staging: str, target: str) -> None:
    entries = sorted(os.listdir(staging))
    bad = [e for e in entries if not stat.S_ISREG(os.lstat(os.path.join(staging, e)).st_mode)]
    if bad:
        raise _invalid(staging, target, f"it has no commit marker and holds {bad}, which are not regular files")
    logger.warning(f"Removing {staging}: the unfinished files of an interrupted save of {target}.")
    for entry in entries:
        file_operation("remove", os.path.join(staging, entry))
        os.remove(os.path.join(staging, entry))
    file_operation("rmdir", staging)
    os.rmdir(staging)


def _recover_locked(target: str) -> None:
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{target} is not a folder: a checkpoint is saved into a folder.")
    for staging in _staging_folders(target):
        if os.path.islink(staging) or not os.path.isdir(staging):
            raise _invalid(staging, target, "it is not a folder but a symbolic link or a file")
        if os.path.lexists(os.path.join(staging, COMMIT_NAME)):
            moves, removes = _read_plan(staging, target)
            logger.warning(f"Finishing an interrupted save of {target} from {staging}.")
            _apply(staging, target, moves, removes)
        else:
            _discard_uncommitted(staging, target)


def recover(directory: str | os.PathLike) -> None:
    """Finish or clean up an interrupted save of ``directory``, under its writer lock (every save does this first;
    loading never does: it only reports an interrupted save).

    A committed save (its staging folder holds a valid commit marker) is completed; an uncommitted staging folder
    holds only the interrupted save's own files and is removed, with a warning. A staging folder whose plan names
    anything but plain files of the two folders is reported with an error and left alone.

    Example:
        >>> normalign.persistence.recover("out/aligned")   # doctest: +SKIP
    """
    with writer_lock(directory) as target:
        _recover_locked(target)


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
    staging folder and leaves ``target`` as it was. The whole save holds the folder's writer lock.
    """
    with writer_lock(target) as resolved:  # a symlinked checkpoint dir: replace what it points at
        _recover_locked(resolved)
        parent, name = os.path.split(resolved)
        staging = os.path.join(parent, f".{name}{_STAGING}{uuid.uuid4().hex[:8]}")
        file_operation("mkdir", staging)
        os.mkdir(staging)
        try:
            yield staging
            moves, removes = _plan(staging, resolved, replaces)
            temporary = os.path.join(staging, f"{COMMIT_NAME}.tmp")
            file_operation("write", temporary)
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump({"moves": moves, "removes": removes}, f)
            file_operation("replace", temporary)
            os.replace(temporary, os.path.join(staging, COMMIT_NAME))  # the commit point
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # this save's own folder
            raise
        _apply(staging, resolved, moves, removes)


def _plan(staging: str, target: str, replaces: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """What the commit will move and remove; only plans :func:`_read_plan` accepts, so recovery can finish them."""
    written = sorted(os.listdir(staging))
    odd = [e for e in written if not stat.S_ISREG(os.lstat(os.path.join(staging, e)).st_mode)]
    if odd:
        raise RuntimeError(f"hf-normalign saves regular files only; the save wrote {odd} into {staging}.")
    old = sorted(os.listdir(target)) if os.path.isdir(target) else []
    removes = [e for e in old if e not in written and replaces(e)]
    blocked = [reason for e in written + removes if (reason := _check_inside(target, e))]
    if blocked:
        raise NormAlignCheckpointError(
            f"Cannot save into {target}: {'; '.join(blocked)}. A save replaces or removes only regular files of its "
            "folder: move that entry away, or save elsewhere. The folder was not changed."
        )
    return written, removes


# --- readers -----------------------------------------------------------------------------------------------------


def _committed(target: str) -> list[str]:
    return [s for s in _staging_folders(target) if os.path.lexists(os.path.join(s, COMMIT_NAME))]


def _interrupted(target: str, staging: list[str]) -> NormAlignCheckpointError:
    return NormAlignCheckpointError(
        f"A save into {target} was interrupted after its commit ({staging[0]} holds the rest of it): the folder holds "
        "part of the previous checkpoint and part of the new one. Loading never changes a folder: finish that save "
        f"with hf_normalign.persistence.recover({target!r}), or save the model into the folder again, then load."
    )


def wait_for_writers(directory: str | os.PathLike) -> None:
    """For readers: return once no committed save of ``directory`` is rolling forward; raise if one was interrupted.
    Writes nothing (the writer lock is only probed, and only when its file exists)."""
    target = os.path.realpath(os.fspath(directory))
    deadline = time.monotonic() + lock_timeout()
    while committed := _committed(target):
        if not os.path.isfile(lock_path(target)):
            raise _interrupted(target, committed)
        try:
            with FileLock(lock_path(target), timeout=0):  # free: no save is running, so this one died
                committed = _committed(target)
                if committed:
                    raise _interrupted(target, committed)
                return
        except Timeout:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"A save into {target} has held its lock {lock_path(target)} for over {lock_timeout():g} s "
                    f"while rolling forward; load again once it is done (or raise {LOCK_TIMEOUT_ENV})."
                ) from None
            time.sleep(_POLL_SECONDS)
        except OSError:  # the lock cannot be opened (a read-only place): nobody can be saving there now
            raise _interrupted(target, committed) from None


def _signature(target: str) -> tuple:
    """What changes whenever a save touches the folder: its entries' identities, and committed staging folders."""
    entries = []
    for name in sorted(os.listdir(target)):
        try:
            info = os.lstat(os.path.join(target, name))
        except FileNotFoundError:
            continue
        entries.append((name, info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size))
    return tuple(entries), tuple(_committed(target))


def read_consistently(folder: str, read: Callable[[], T], undo: Callable[[], None] | None = None) -> T:
    """``read()`` a checkpoint folder so that the result comes from one complete save: wait for a save that is
    rolling forward, refuse an interrupted one, and read again (up to 3 times, after ``undo()``) when a save changed
    the folder meanwhile (also when the read failed then: its error may be the save's doing)."""
    target = os.path.realpath(folder)
    for attempt in range(_READ_ATTEMPTS):
        if attempt and undo is not None:
            undo()
        wait_for_writers(target)
        before = _signature(target)
        try:
            result = read()
        except Exception:
            if _signature(target) == before:
                raise  # the folder itself is at fault
            continue  # the error may come from files a save replaced meanwhile (a hash that no longer matches)
        if _signature(target) == before:
            return result
    raise NormAlignCheckpointError(
        f"{target} changed while it was read, {_READ_ATTEMPTS} times: another process keeps saving into it. Load it "
        "once that process is done."
    )
