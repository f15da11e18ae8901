"""Probe sets for the diagnostics: image-text pairs, image i paired with text i.

Three sources:

- :func:`default_probe`: built offline by the project. Images are drawn procedurally and
  deterministically from a seed (documents, charts and scene-like pictures, in turn); the texts are
  100 short news-like passages written for this project (``probe_data/passages.txt``, fictional
  places and people), so the probe needs no download and is the same on every machine.
- :func:`load_probe`: your own image folder plus a text file or folder.
- :func:`probe_from_dataset`: a HF ``datasets`` dataset with an image and a text column.

Images are decoded lazily (when the probe is encoded for a model); a file that does not decode
raises ``ValueError`` naming it. Subsets are drawn with :meth:`Probe.sample` (seeded, original order
kept), so the same ``(num_samples, seed)`` always picks the same pairs.

Example:
    >>> from hf_normalign.diagnostics.probes import default_probe
    >>> probe = default_probe()
    >>> len(probe), probe[0].name
    (100, 'default/000-document')
    >>> probe[0].load_image().size
    (336, 336)
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image, ImageDraw

from ...text_files import read_jsonl, read_text

__all__ = [
    "DEFAULT_KINDS",
    "DEFAULT_PROBE_SIZE",
    "IMAGE_EXTENSIONS",
    "Probe",
    "ProbeSample",
    "default_passages",
    "default_probe",
    "load_probe",
    "probe_from_dataset",
    "sample_indices",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_PROBE_SIZE = 100  # passages shipped with the project
DEFAULT_KINDS: tuple[str, ...] = ("document", "chart", "scene")  # image classes, in turn

ImageSource = Image.Image | str | Path | Callable[[], Image.Image]


@dataclass(frozen=True)
class ProbeSample:
    """One image-text pair. ``image`` is a PIL image, a path, or a zero-argument callable returning one."""

    image: ImageSource
    text: str
    name: str

    def load_image(self) -> Image.Image:
        """The image as RGB; ``ValueError`` naming the file (or sample) when it cannot be decoded."""
        source = self.image
        try:
            if isinstance(source, (str, Path)):
                with Image.open(source) as img:
                    img.load()
                    return img.convert("RGB")
            img = source() if callable(source) else source
            if not isinstance(img, Image.Image):
                raise TypeError(f"expected a PIL image, got {type(img).__name__}")
            return img.convert("RGB")
        except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as err:
            where = f"file {source}" if isinstance(source, (str, Path)) else f"sample {self.name!r}"
            raise ValueError(f"cannot decode the image of {where}: {err}") from err


def sample_indices(total: int, num_samples: int | None, seed: int = 0) -> list[int]:
    """Indices of a seeded subset of ``range(total)`` in increasing order (all of them if it is small).

    Example:
        >>> sample_indices(10, 3, seed=0) == sample_indices(10, 3, seed=0)
        True
        >>> sample_indices(3, 10)
        [0, 1, 2]
    """
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
    ):
        raise ValueError(f"num_samples must be an integer >= 1 (or None for all), got {num_samples!r}")
    if num_samples is None or num_samples >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), num_samples))


class Probe(Sequence[ProbeSample]):
    """An ordered list of :class:`ProbeSample` with a name (recorded in results).

    Example:
        >>> from PIL import Image
        >>> probe = Probe.from_pairs([(Image.new("RGB", (8, 8)), "a passage"), (Image.new("RGB", (8, 8)), "another")])
        >>> len(probe.sample(1, seed=0))
        1
    """

    def __init__(self, samples: Iterable[ProbeSample], *, name: str = "custom") -> None:
        self.samples: list[ProbeSample] = list(samples)
        self.name = name
        for s in self.samples:
            if not isinstance(s, ProbeSample):
                raise TypeError(f"a Probe holds ProbeSample objects, got {type(s).__name__}")
            if not s.text.strip():
                raise ValueError(f"sample {s.name!r} has an empty text passage")

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[ImageSource, str]], *, name: str = "custom") -> Probe:
        """From ``(image, text)`` pairs; images may be PIL images or paths."""
        samples = []
        for i, (image, text) in enumerate(pairs):
            label = str(image) if isinstance(image, (str, Path)) else f"{name}[{i}]"
            samples.append(ProbeSample(image, text, label))
        return cls(samples, name=name)

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, index: int) -> ProbeSample: ...
    @overload
    def __getitem__(self, index: slice) -> Probe: ...
    def __getitem__(self, index: int | slice) -> ProbeSample | Probe:
        if isinstance(index, slice):
            return Probe(self.samples[index], name=self.name)
        return self.samples[index]

    def sample(self, num_samples: int | None, seed: int = 0) -> Probe:
        """A seeded subset of ``num_samples`` pairs in their original order (see :func:`sample_indices`)."""
        keep = sample_indices(len(self), num_samples, seed)
        if len(keep) == len(self):
            return self
        return Probe([self.samples[i] for i in keep], name=f"{self.name}, {len(keep)} of {len(self)} (seed {seed})")

    def __repr__(self) -> str:
        return f"Probe({self.name!r}, {len(self)} pairs)"


# ----------------------------------------------------------------------------------------------------------
# Default probe
# ----------------------------------------------------------------------------------------------------------


@cache
def default_passages() -> tuple[str, ...]:
    """The 100 news-like passages shipped with the project (fictional, written for it)."""
    text = resources.files("hf_normalign.diagnostics").joinpath("probe_data/passages.txt").read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def default_probe(num_samples: int = DEFAULT_PROBE_SIZE, seed: int = 0, *, image_size: int = 336) -> Probe:
    """The built-in probe: procedurally drawn images paired with the shipped passages, no network needed.

    Image i is a document, a chart or a scene (i mod 3) drawn from ``(seed, i)`` and paired with
    passage i; ``num_samples`` < 100 takes a seeded subset. Images are drawn when first loaded.

    Example:
        >>> [s.name for s in default_probe()[:3]]
        ['default/000-document', 'default/001-chart', 'default/002-scene']
        >>> len(default_probe(num_samples=20, seed=1))
        20
    """
    passages = default_passages()
    sample_indices(len(passages), num_samples)  # validates num_samples
    if num_samples > len(passages):
        raise ValueError(
            f"the default probe has {len(passages)} pairs, {num_samples} were asked for; "
            "use load_probe or probe_from_dataset for a larger probe set"
        )
    samples = [
        ProbeSample(_DrawnImage(i, seed, image_size), text, f"default/{i:03d}-{DEFAULT_KINDS[i % 3]}")
        for i, text in enumerate(passages)
    ]
    probe = Probe(samples, name=f"default (seed {seed})")
    return probe.sample(num_samples, seed) if num_samples < len(passages) else probe


@dataclass(frozen=True)
class _DrawnImage:
    """Lazily drawn default-probe image (a picklable callable)."""

    index: int
    seed: int
    size: int

    def __call__(self) -> Image.Image:
        rng = np.random.default_rng([self.seed, self.index])
        draw = (_draw_document, _draw_chart, _draw_scene)[self.index % 3]
        # Drawn at 336 px, the size the shapes are laid out for, then resized.
        img = draw(rng, 336)
        arr = np.asarray(img, dtype=np.float32)
        # Mild sensor-like noise: flat colour areas would otherwise give many identical patches.
        arr += 4.0 * rng.standard_normal(arr.shape, dtype=np.float32)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        return img if self.size == 336 else img.resize((self.size, self.size), Image.Resampling.BICUBIC)


# A 5x7 pixel font (rows as 5-bit masks), so drawn text is identical on every machine and Pillow build.
_GLYPHS: dict[str, tuple[int, ...]] = {
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30), "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17), "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17), "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4), "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31), "0": (14, 17, 19, 21, 25, 17, 14),
    "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31), "3": (31, 2, 4, 2, 1, 17, 14),
    "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14), "6": (6, 8, 16, 30, 17, 17, 14),
    "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14), "9": (14, 17, 17, 15, 1, 2, 12),
    ".": (0, 0, 0, 0, 0, 12, 12), ",": (0, 0, 0, 0, 12, 4, 8), "-": (0, 0, 0, 31, 0, 0, 0),
    "%": (24, 25, 2, 4, 8, 19, 3), "'": (4, 4, 8, 0, 0, 0, 0), ":": (0, 12, 12, 0, 12, 12, 0), " ": (0,) * 7,
}  # fmt: skip
# Each glyph as a 7x6 boolean array: 5 columns of the character and one blank column after it.
_GLYPH_BITS = {
    c: np.array([[(row << 1 >> (5 - b)) & 1 for b in range(6)] for row in rows], bool) for c, rows in _GLYPHS.items()
}


def _stamp_text(img: Image.Image, xy: tuple[int, int], text: str, scale: int, color: tuple[int, ...]) -> int:
    """Draw ``text`` (upper-cased, unknown characters as blanks) at ``xy``; returns the x after it."""
    glyphs = [_GLYPH_BITS.get(c, _GLYPH_BITS[" "]) for c in text.upper()]
    if not glyphs:
        return xy[0]
    mask = np.concatenate(glyphs, axis=1).repeat(scale, axis=0).repeat(scale, axis=1)
    x, y = xy
    w = max(0, min(mask.shape[1], img.width - x))
    h = max(0, min(mask.shape[0], img.height - y))
    if w and h:
        stencil = Image.fromarray((mask[:h, :w] * 255).astype(np.uint8))
        img.paste(color, (x, y, x + w, y + h), stencil)
    return x + mask.shape[1]


def _words(rng: np.random.Generator, n: int) -> list[str]:
    passage = default_passages()[int(rng.integers(len(default_passages())))]
    words = [w.strip(".,;:\"'()") for w in passage.split()]
    start = int(rng.integers(max(1, len(words) - n)))
    return [w for w in words[start : start + n] if w]


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def _draw_document(rng: np.random.Generator, size: int) -> Image.Image:
    paper = tuple(int(c) for c in 255 - rng.integers(0, 18, 3))
    img = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(img)
    ink = tuple(int(c) for c in rng.integers(0, 70, 3))
    margin = int(rng.integers(14, 30))
    y = margin
    # Title: larger text, sometimes on a coloured banner.
    if rng.random() < 0.5:
        banner = _color(rng, 40, 200)
        draw.rectangle((0, 0, size, margin + 26), fill=banner)
        _stamp_text(img, (margin, margin // 2 + 4), " ".join(_words(rng, 3)), 3, (255, 255, 255))
        y = margin + 40
    else:
        _stamp_text(img, (margin, y), " ".join(_words(rng, 3)), 3, ink)
        y += 32
    columns = int(rng.integers(1, 3))
    col_w = (size - 2 * margin - (columns - 1) * 12) // columns
    for col in range(columns):
        x0, cy = margin + col * (col_w + 12), y
        while cy < size - margin - 10:
            if rng.random() < 0.12:  # a figure or table block
                h = int(rng.integers(30, 70))
                draw.rectangle((x0, cy, x0 + col_w, cy + h), outline=ink, fill=_color(rng, 150, 240))
                for gx in range(x0, x0 + col_w, max(8, col_w // int(rng.integers(2, 6)))):
                    draw.line((gx, cy, gx, cy + h), fill=ink)
                cy += h + 8
                continue
            line, x = _words(rng, 12), x0
            for word in line:
                if x + 6 * len(word) > x0 + col_w:
                    break
                x = _stamp_text(img, (x, cy), word, 1, ink) + 4
            cy += 11 if rng.random() > 0.15 else 18  # paragraph breaks
    return img


def _draw_chart(rng: np.random.Generator, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), _color(rng, 225, 256))
    draw = ImageDraw.Draw(img)
    ink = (40, 40, 40)
    _stamp_text(img, (20, 12), " ".join(_words(rng, 3)), 2, ink)
    left, top, right, bottom = 46, 44, size - 18, size - 40
    kind = int(rng.integers(3))
    if kind == 2:  # pie chart with a legend
        values = rng.uniform(1, 10, int(rng.integers(3, 7)))
        start = 0.0
        box = (left, top + 10, left + 190, top + 200)
        for i, v in enumerate(values):
            end = start + 360 * v / values.sum()
            color = _color(rng, 30, 230)
            draw.pieslice(box, start, end, fill=color, outline=(255, 255, 255))
            draw.rectangle((left + 205, top + 20 + 22 * i, left + 217, top + 32 + 22 * i), fill=color)
            _stamp_text(img, (left + 222, top + 22 + 22 * i), f"{100 * v / values.sum():.0f}%", 1, ink)
            start = end
        return img
    step = int(rng.choice([1, 2, 5, 10, 20, 50, 100]))
    for i, gy in enumerate(np.linspace(bottom, top, 6)):  # grid, axes and tick labels
        draw.line((left, gy, right, gy), fill=(200, 200, 200))
        _stamp_text(img, (8, int(gy) - 3), str(i * step), 1, ink)
    draw.line((left, top, left, bottom), fill=ink, width=2)
    draw.line((left, bottom, right, bottom), fill=ink, width=2)
    n = int(rng.integers(4, 12))
    xs = np.linspace(left + 12, right - 12, n)
    heights = rng.uniform(0.1, 0.95, n) * (bottom - top)
    if kind == 0:  # bars
        width = (right - left) / n * 0.6
        colors = [_color(rng, 30, 220)] * n if rng.random() < 0.5 else [_color(rng, 30, 220) for _ in range(n)]
        for x, h, c in zip(xs, heights, colors, strict=True):
            draw.rectangle((x - width / 2, bottom - h, x + width / 2, bottom), fill=c)
    else:  # one to three lines with markers
        for _ in range(int(rng.integers(1, 4))):
            c = _color(rng, 20, 220)
            ys = bottom - np.clip(heights + rng.normal(0, 20, n), 5, bottom - top)
            draw.line(list(zip(xs, ys, strict=True)), fill=c, width=2)
            for x, y in zip(xs, ys, strict=True):
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=c)
            heights = rng.uniform(0.1, 0.95, n) * (bottom - top)
    first = int(rng.integers(1, 2000))
    for i, x in list(enumerate(xs))[:: max(1, n // 6)]:
        _stamp_text(img, (int(x) - 6, bottom + 8), str(first + i), 1, ink)
    return img


def _draw_scene(rng: np.random.Generator, size: int) -> Image.Image:
    horizon = int(rng.integers(size // 3, 2 * size // 3))
    top, low = np.array(_color(rng, 60, 200)), np.array(_color(rng, 150, 256))
    t = np.linspace(0, 1, horizon)[:, None]
    sky = (top * (1 - t) + low * t).astype(np.uint8)  # vertical gradient
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:horizon] = sky[:, None, :]
    arr[horizon:] = _color(rng, 30, 180)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.7:  # sun or moon
        r, cx, cy = int(rng.integers(12, 34)), int(rng.integers(30, size - 30)), int(rng.integers(20, horizon))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_color(rng, 200, 256))
    for _ in range(int(rng.integers(0, 4))):  # clouds
        cx, cy = int(rng.integers(0, size)), int(rng.integers(10, max(11, horizon - 20)))
        for dx in (-18, 0, 18):
            draw.ellipse((cx + dx - 20, cy - 12, cx + dx + 20, cy + 12), fill=(245, 245, 245))
    for _ in range(int(rng.integers(1, 4))):  # mountains on the horizon
        peak = int(rng.integers(0, size))
        h, w = int(rng.integers(30, horizon)), int(rng.integers(60, 200))
        draw.polygon([(peak - w, horizon), (peak, horizon - h), (peak + w, horizon)], fill=_color(rng, 40, 150))
    if rng.random() < 0.5:  # water or a road into the distance
        c = _color(rng, 40, 120)
        mid = int(rng.integers(size // 4, 3 * size // 4))
        draw.polygon([(mid - 8, horizon), (mid + 8, horizon), (mid + 120, size), (mid - 120, size)], fill=c)
    for _ in range(int(rng.integers(2, 9))):  # trees and houses in front
        x, base = int(rng.integers(0, size)), int(rng.integers(horizon + 5, size))
        s = int(8 + 40 * (base - horizon) / (size - horizon))  # nearer is larger
        if rng.random() < 0.6:
            draw.rectangle((x - s // 6, base - s, x + s // 6, base), fill=(90, 60, 30))
            draw.polygon([(x - s, base - s // 2), (x, base - 3 * s), (x + s, base - s // 2)], fill=_color(rng, 10, 120))
        else:
            draw.rectangle((x - s, base - s, x + s, base), fill=_color(rng, 120, 240))
            draw.polygon([(x - s - 4, base - s), (x, base - 2 * s), (x + s + 4, base - s)], fill=_color(rng, 60, 160))
            draw.rectangle((x - s // 4, base - s // 2, x + s // 4, base), fill=(60, 40, 30))
    return img


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
