"""Probe loaders: your own image folder (or list) plus a text file or folder (:func:`load_probe`), or a HF
``datasets`` dataset with an image and a text column (:func:`probe_from_dataset`). Images decode lazily; a file
that does not decode raises ``ValueError`` naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...text_files import read_jsonl, read_text
from .probe import DEFAULT_PROBE_SIZE, IMAGE_EXTENSIONS, ImageSource, Probe, ProbeSample, sample_indices

__all__ = ["load_probe", "probe_from_dataset"]


# ----------------------------------------------------------------------------------------------------------
# User probe sets
# ----------------------------------------------------------------------------------------------------------


def _jsonl_passage(path: Path, line: int, record: Any) -> str:
    """The ``"text"`` string of one ``.jsonl`` record; anything else (no field, null, a number) is refused."""
    where = f"{path}, line {line}"
    if not isinstance(record, dict) or "text" not in record:
        got = f"keys {sorted(record)}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise ValueError(f'{where}: expected an object with a "text" string, got {got}: write {{"text": "..."}}')
    text = record["text"]
    if not isinstance(text, str) or not text.strip():
        got = "null" if text is None else repr(text) if isinstance(text, str) else f"a {type(text).__name__}"
        raise ValueError(f'{where}: "text" must be a non-empty string, got {got}: fix or remove that line')
    return text.strip()


def _read_texts(texts: str | Path | Sequence[str]) -> list[str]:
    if not isinstance(texts, (str, Path)):
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, not a string: pass passages as str")
        return list(texts)
    path = Path(texts)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        return [read_text(p).strip() for p in files]
    if not path.is_file():
        raise FileNotFoundError(f"text file or folder not found: {path}")
    if path.suffix.lower() == ".jsonl":
        return [_jsonl_passage(path, line, record) for line, record in read_jsonl(path)]
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def load_probe(
    images: str | Path | Sequence[str | Path],
    texts: str | Path | Sequence[str],
    *,
    num_samples: int | None = DEFAULT_PROBE_SIZE,
    seed: int = 0,
) -> Probe:
    """A probe from your own images and passages: image i (sorted by file name) pairs with text i.

    Args:
        images: a folder (its files with an image extension, sorted by name, not recursive) or a list
            of image paths (kept in the given order).
        texts: a ``.txt`` file (one passage per non-empty line), a ``.jsonl`` file (a ``"text"``
            field per line), a folder of ``.txt`` files (one passage per file, sorted by name), or a
            list of strings.
        num_samples: how many pairs to keep (a seeded subset, original order kept); ``None`` keeps all.
        seed: seed of the subset.

    If there are more images than texts (or the reverse), the extra ones are ignored with a warning.
    Images are decoded when the probe is used; one that does not decode raises ``ValueError`` naming it.

    Example:
        >>> probe = load_probe("textvqa/val_images", "stories.txt", num_samples=100)  # doctest: +SKIP
    """
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}")
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        where = str(folder)
    else:
        paths, where = [Path(p) for p in images], "the image list"
    passages = _read_texts(texts)
    if not paths:
        raise ValueError(f"empty probe set: no images ({', '.join(IMAGE_EXTENSIONS)}) in {where}")
    if not passages:
        raise ValueError(f"empty probe set: no text passages in {texts}")
    if len(paths) != len(passages):
        warnings.warn(
            f"{len(paths)} images but {len(passages)} texts: pairing the first {min(len(paths), len(passages))}",
            stacklevel=2,
        )
    pairs = [ProbeSample(p, t, str(p)) for p, t in zip(paths, passages, strict=False)]
    return Probe(pairs, name=f"{where} + {texts if isinstance(texts, (str, Path)) else 'texts'}").sample(
        num_samples, seed
    )


def _dataset_image(value: Any) -> ImageSource:
    if isinstance(value, (Image.Image, str, Path)):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            import io

            data = value["bytes"]
            return lambda: Image.open(io.BytesIO(data))
        return value["path"]
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def probe_from_dataset(
    dataset: Any,
    *,
    image_column: str = "image",
    text_column: str = "text",
    num_samples: int | None = DEFAULT_PROBE_SIZE,
    seed: int = 0,
) -> Probe:
    """A probe from a HF ``datasets.Dataset`` (or any indexable of dict rows): row i gives pair i.

    The image column may hold PIL images (the ``datasets.Image`` feature), ``{"bytes", "path"}`` dicts
    (``Image(decode=False)``), paths or arrays. Only the ``num_samples`` selected rows are read.

    Example:
        >>> ds = datasets.load_dataset("lmms-lab/textvqa", split="validation")  # doctest: +SKIP
        >>> probe = probe_from_dataset(ds, image_column="image", text_column="question")  # doctest: +SKIP
    """
    total = len(dataset)
    if total == 0:
        raise ValueError("empty probe set: the dataset has no rows")
    columns = getattr(dataset, "column_names", None)
    for col in (image_column, text_column):
        if columns is not None and col not in columns:
            raise ValueError(f"column {col!r} not in the dataset (columns: {', '.join(columns)})")
    samples = []
    for i in sample_indices(total, num_samples, seed):
        row = dataset[i]
        try:
            image = _dataset_image(row[image_column])
        except TypeError as err:
            raise ValueError(f"dataset row {i}, column {image_column!r}: {err}") from err
        samples.append(ProbeSample(image, str(row[text_column]).strip(), f"dataset row {i}"))
    name = getattr(getattr(dataset, "info", None), "dataset_name", None) or type(dataset).__name__
    return Probe(samples, name=f"{name}, {len(samples)} of {total} rows (seed {seed})")
