"""The default probe's images, drawn procedurally and deterministically from ``(seed, index)``: documents, charts
and scene-like pictures (:func:`~.probe.default_probe` pairs them with the shipped passages). Text is stamped with
a built-in 5x7 pixel font, so an image is identical on every machine and Pillow build.

Example:
    >>> DrawnImage(0, 0, 64)().size
    (64, 64)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .passages import default_passages

__all__ = ["DrawnImage"]


@dataclass(frozen=True)
class DrawnImage:
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
