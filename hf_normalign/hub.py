"""Uploading aligned checkpoints and adapters to the Hugging Face Hub, with a generated model card.

Example:
    >>> import hf_normalign as normalign
    >>> normalign.push_to_hub(model, "me/llava-1.5-7b-normalign", private=True)        # doctest: +SKIP
    >>> normalign.push_to_hub("out/aligned", "me/llava-normalign-adapter", adapter_only=True)  # doctest: +SKIP

Command line: ``normalign push DIR REPO_ID [--adapter-only] [--private]`` (:mod:`hf_normalign.commands.push`).
"""

from __future__ import annotations

import html
import json
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn
from transformers.utils import logging

from .config import METHOD_CONFIGS, METHODS
from .persistence.format import CONFIG_NAME, WEIGHTS_NAME, NormAlignCheckpointError
from .persistence.info import CheckpointInfo
from .persistence.save import save_pretrained

logger = logging.get_logger(__name__)

CARD_NAME = "README.md"
# Never uploaded: hf-normalign neither writes nor reads pickle, and a Trainer output folder holds some
# (training_args.bin, optimizer.pt, rng_state.pth).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _hub_id(name: str | None) -> str | None:
    """``name`` if it is a Hub repo id (not a local path), for the card's ``base_model`` metadata."""
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name if "/" in name else None


# Markdown's inline punctuation (emphasis, code, links, images, tables, strikethrough) and the escape itself.
_MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]!|~])")


def _printable(value: Any) -> str:
    """Non-printable characters (newlines included, so that no value can start a line of its own: a heading, a
    table row) as visible escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def _text(value: Any) -> str:
    """``value`` as literal text in Markdown and in the HTML it renders to: a checkpoint's strings are data, never
    markup. Markdown's inline punctuation is backslash-escaped, ``& < >`` become entities."""
    return html.escape(_MARKDOWN_INLINE.sub(r"\\\1", _printable(value)), quote=False)


def _code(value: Any, *, in_table: bool = False) -> str:
    """``value`` as a code span: its text is shown as it is (HTML included) by CommonMark's rule; the fence is longer
    than any run of backticks inside, and in a table cell ``|`` is escaped (GFM splits cells before code spans)."""
    text = _printable(value)
    if in_table:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _mir_value(mir: Any) -> float | None:
    value = getattr(mir, "mir", mir)
    return None if value is None else float(value)


def model_card(info: CheckpointInfo, repo_id: str, *, mir: Any = None, tags: Sequence[str] = ()) -> str:
    """The README.md of an uploaded checkpoint: metadata, methods and settings, MIR, usage and the warning.

    ``mir`` is a float or a ``MIRResult``; ``None`` renders "not measured". Every string read from the checkpoint
    (or given as a tag) is escaped for Markdown and HTML: the card shows it, it cannot add headings, links or tags.

    Example:
        >>> print(model_card(read_checkpoint_info("out/aligned"), "me/aligned", mir=3.12))  # doctest: +SKIP
    """
    try:  # it is written into the usage code below
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"model_card: {repo_id!r} is not a Hub repo id: {err}") from err
    base_id = _hub_id(info.base_model_name_or_path)
    all_tags = ["hf-normalign", *(m.replace("_", "-") for m in info.config.methods), *tags]
    meta = [f"base_model: {base_id}"] if base_id else []
    meta += [
        f"library_name: {'hf-normalign' if info.adapter_only else 'transformers'}",
        "pipeline_tag: image-text-to-text",
        "tags:",
        *(f"- {json.dumps(tag)}" for tag in dict.fromkeys(all_tags)),  # a JSON string is a YAML scalar
    ]
    kind = "an hf-normalign adapter" if info.adapter_only else "a vision-language model aligned with hf-normalign"
    base = _code(info.base_model_name_or_path) if info.base_model_name_or_path else "an unnamed base model"
    lines = ["---", *meta, "---", "", f"# {repo_id.split('/')[-1]}", "", f"This is {kind}, on top of {base}.", ""]

    if info.adapter_only:
        warning = (
            "This repository holds only the hf-normalign files: transformers without hf-normalign cannot load it. "
            "`hf_normalign.from_pretrained` loads the base model named below and applies the adapter."
        )
    else:
        warning = (
            "transformers without hf-normalign loads the base model **without the intervention**: it ignores "
            f"`{CONFIG_NAME}` and `{WEIGHTS_NAME}` and gives different outputs. Install and import hf-normalign "
            "before loading."
        )
    lines += [f"> **Warning:** {warning}", "", "## Interventions", ""]
    lines += ["| Method | Setting | Value |", "| --- | --- | --- |"]
    for method in info.config.methods:
        settings = getattr(info.config, method)
        for key, value in settings.to_dict().items():
            shown = (
                _text(settings.NONE_MEANS.get(key, "default"))
                if value is None
                else _code(json.dumps(value), in_table=True)
            )
            lines.append(f"| {settings.TITLE} | {_code(key, in_table=True)} | {shown} |")
    off = [m for m in METHODS if m not in info.config.methods]
    if off:
        lines += ["", f"Not applied: {', '.join(METHOD_CONFIGS[m].TITLE for m in off)}."]

    mir_value = _mir_value(mir)
    samples = getattr(mir, "num_samples", None)
    mir_text = (
        "not measured" if mir_value is None else f"{mir_value:.4f}" + (f" ({samples} samples)" if samples else "")
    )
    lines += [
        "",
        "## Details",
        "",
        f"- Base model: {base} ({_text(info.base_model_class)}, model_type {_code(info.base_model_type)}, hidden "
        f"size {_text(info.hidden_size)}, {_text(info.num_decoder_layers)} decoder layers)"
        + (f", revision {_code(info.base_model_revision)}" if info.base_model_revision else ""),
        f"- MIR (Modality Integration Rate, lower is better): {mir_text}",
        f"- Checkpoint format {_text(info.format_version)}, written by hf-normalign "
        + _text(info.library_version or "unknown"),
    ]
    if info.modules_to_save:
        lines.append(f"- Modules trained alongside, included: {', '.join(_code(m) for m in info.modules_to_save)}")

    lines += ["", "## Usage", "", "```python", "import hf_normalign as normalign", ""]
    if info.adapter_only:
        lines += [
            f'model = normalign.from_pretrained("{repo_id}")  # loads the base, then the adapter',
            "# or on a base you loaded yourself (quantised, say):",
            f'# model = normalign.from_pretrained("{repo_id}", base_model=base)',
        ]
    else:
        lines += [
            "from transformers import AutoModelForImageTextToText",
            "",
            "# importing hf_normalign makes from_pretrained apply the intervention",
            f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}")',
            f'# or: model = normalign.from_pretrained("{repo_id}")',
        ]
    lines += ["assert normalign.is_patched(model)", "```", ""]
    return "\n".join(lines)


def _folder_files(folder: str) -> list[str]:
    """Paths (relative, ``/``-separated) to upload: everything but hidden entries, pickles and the card.

    A symbolic link to a file inside the folder is uploaded as that file. A link that leads outside the folder, to
    a folder, or nowhere is refused (:func:`_check_link`): what is uploaded is what the folder holds."""
    real_root = os.path.realpath(folder)
    files, skipped = [], []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in dirs:  # os.walk lists a linked folder here and does not enter it
            _check_link(os.path.join(root, name), folder, real_root)
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if name.startswith(".") or rel == CARD_NAME:
                continue
            _check_link(os.path.join(root, name), folder, real_root)
            (skipped if name.endswith(PICKLE_SUFFIXES) else files).append(rel)
    if skipped:
        logger.warning(f"Not uploading {skipped}: pickle files are never uploaded by hf-normalign.")
    return files


def _check_link(path: str, folder: str, real_root: str) -> None:
    """Refuse a symbolic link unless it points to a file inside the folder (resolved, links of links included)."""
    if not os.path.islink(path):
        return
    target = os.path.realpath(path)
    fix = (
        "push_to_hub uploads only what the folder itself holds: replace the link by a copy of the file (for a whole "
        "folder: cp -rL SRC DST, which copies what links point to) and push that"
    )
    if os.path.commonpath([real_root, target]) != real_root:
        raise ValueError(f"{path} is a symbolic link to {target}, outside {folder}: {fix}")
    if not os.path.isfile(target):
        raise ValueError(f"{path} is a symbolic link to {target}, which is not a file: {fix}")


def _prepare(
    model_or_path: nn.Module | str | os.PathLike,
    folder: str,
    adapter_only: bool | None,
    include: Sequence[str] | None,
    max_shard_size: int | str | None,
) -> str:
    if isinstance(model_or_path, nn.Module):
        if adapter_only:
            save_pretrained(model_or_path, folder, adapter_only=True, include=include)
        else:
            if include is not None:
                raise ValueError("include= applies to adapter_only=True.")
            save_pretrained(model_or_path, folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        return folder
    path = os.fspath(model_or_path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a local directory: pass a patched model or the directory of an aligned save.")
    if include is not None:
        raise ValueError(f"include= applies when saving a model; {path} is uploaded as it is.")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise NormAlignCheckpointError(
            f"{path} holds no {CONFIG_NAME}: it is not an aligned checkpoint. Save a patched model with "
            "model.save_pretrained(path) (or hf_normalign.save_pretrained) first."
        )
    info = CheckpointInfo.from_file(os.path.join(path, CONFIG_NAME))
    if adapter_only is not None and adapter_only != info.adapter_only:
        held = "an adapter" if info.adapter_only else "a full checkpoint"
        raise ValueError(
            f"{path} holds {held}, but adapter_only={adapter_only} was asked for. Pass the patched model instead, "
            "or save it in the other form with hf_normalign.save_pretrained(model, dir, adapter_only=...)."
        )
    return path


def push_to_hub(
    model_or_path: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    adapter_only: bool | None = None,
    include: Sequence[str] | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    mir: Any = None,
    tags: Sequence[str] | None = None,
    max_shard_size: int | str | None = None,
    api: HfApi | None = None,
) -> CommitInfo:
    """Upload a patched model, or the directory of an aligned save, in one commit with a generated model card.

    Args:
        model_or_path: a patched model (saved to a temporary directory first) or a local aligned checkpoint
            or adapter directory (uploaded as it is, minus hidden and pickle files; a symbolic link is uploaded
            only when it points to a file inside the directory, and refused with ``ValueError`` otherwise).
        repo_id: the target repo, created if missing (``private`` applies then).
        adapter_only: for a model: upload the adapter form (default False); for a directory: must match
            what it holds (default: whatever it holds).
        include: adapter form of a model: modules saved with the plugin (default ``("projector",)``).
        mir: the model's MIR (a float or ``MIRResult``), shown in the card.
        tags: extra card tags.
        api: the ``HfApi`` to use (default ``HfApi(token=token)``).

    Returns the ``CommitInfo`` of the commit (or pull request with ``create_pr=True``).

    Example:
        >>> normalign.push_to_hub(model, "me/llava-normalign", mir=normalign.diagnostics.mir(model, proc))
        ... # doctest: +SKIP
    """
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        # A sub-folder: a save's lock file and staging folder go beside it, inside the temporary folder.
        folder = _prepare(model_or_path, os.path.join(tmp, "checkpoint"), adapter_only, include, max_shard_size)
        info = CheckpointInfo.from_file(os.path.join(folder, CONFIG_NAME))
        files = _folder_files(folder)
        # The repo is created only once the folder checks out, so a bad input leaves nothing behind.
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        card = model_card(info, repo_id, mir=mir, tags=tags or ())
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=os.path.join(folder, rel)) for rel in files]
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode("utf-8")))
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        default_message = f"Upload hf-normalign {'adapter' if info.adapter_only else 'aligned model'}"
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or default_message,
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
