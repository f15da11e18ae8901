"""A labelled probe: images of drawn shapes with image classes and per-pixel object maps, for the
visual-degradation diagnostics (linear probe, patch contrast).

Example:
    >>> lp = shapes_probe(6)
    >>> len(lp), lp.class_names[lp.image_labels[0]], lp.label_maps[0].shape
    (6, 'rectangle', (336, 336))
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .probe import DEFAULT_KINDS, Probe, ProbeSample, default_passages, sample_indices

__all__ = ["SHAPE_CLASSES", "LabelledProbe", "LabelledSamples", "labels_from_names", "resolve_labelled", "shapes_probe"]

SHAPE_CLASSES: tuple[str, ...] = ("rectangle", "ellipse", "triangle")


@dataclass
class LabelledProbe:
    """A :class:`~.probe.Probe` with image labels and / or per-pixel object maps (-1 = background).

    Example:
        >>> lp = shapes_probe(6)
        >>> len(lp), lp.class_names[lp.image_labels[0]], lp.label_maps[0].shape
        (6, 'rectangle', (336, 336))
    """

    probe: Probe
    image_labels: list[int] | None = None
    class_names: list[str] | None = None
    label_maps: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        for name in ("image_labels", "label_maps"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.probe):
                raise ValueError(f"{name} has {len(value)} entries for {len(self.probe)} probe pairs")

    def __len__(self) -> int:
        return len(self.probe)


def _draw_shapes(index: int, seed: int, size: int) -> tuple[Image.Image, np.ndarray, int]:
    rng = np.random.default_rng([seed, index, 7])
    kind = index % len(SHAPE_CLASSES)
    # Background: a smooth two-colour gradient in a random direction, plus fine noise.
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    theta = rng.uniform(0, 2 * np.pi)
    t = np.cos(theta) * xx + np.sin(theta) * yy
    t = (t - t.min()) / (t.max() - t.min())
    bg = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    label = Image.new("I", (size, size), -1)
    draw, ldraw = ImageDraw.Draw(img), ImageDraw.Draw(label)
    h = size // 2
    layouts = {  # regions (x0, y0, x1, y1) of the objects: halves and quadrants
        2: [[(0, 0, h, size), (h, 0, size, size)], [(0, 0, size, h), (0, h, size, size)]],
        3: [
            [(0, 0, h, size), (h, 0, size, h), (h, h, size, size)],
            [(0, 0, size, h), (0, h, h, size), (h, h, size, size)],
        ],
        4: [[(0, 0, h, h), (h, 0, size, h), (0, h, h, size), (h, h, size, size)]],
    }
    options = layouts[int(rng.integers(2, 5))]
    regions = options[int(rng.integers(len(options)))]
    for obj, (x0, y0, x1, y1) in enumerate(regions):
        mx, my = int((x1 - x0) * rng.uniform(0.04, 0.1)), int((y1 - y0) * rng.uniform(0.04, 0.1))
        box = (x0 + mx, y0 + my, x1 - mx - 1, y1 - my - 1)
        color = tuple(int(c) for c in (255 - bg[(y0 + y1) // 2, (x0 + x1) // 2] + rng.integers(-40, 40, 3)) % 256)
        for target, fill in ((draw, color), (ldraw, obj)):
            if kind == 0:
                target.rectangle(box, fill=fill)
            elif kind == 1:
                target.ellipse(box, fill=fill)
            else:
                target.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 6.0, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), np.asarray(label, dtype=np.int64), kind


@dataclass(frozen=True)
class _ShapesImage:
    """Lazily drawn image of the shapes probe (a picklable callable, as the default probe's)."""

    index: int
    seed: int
    size: int

    def __call__(self) -> Image.Image:
        return _draw_shapes(self.index, self.seed, self.size)[0]


def shapes_probe(num_samples: int = 60, seed: int = 0, *, image_size: int = 336) -> LabelledProbe:
    """A labelled probe of procedurally drawn images: two to four shapes of one kind per image.

    Image i holds rectangles, ellipses or triangles (i mod 3; the image label, class names in
    :data:`SHAPE_CLASSES`), one per half or quadrant of the image, each in its own colour, on a
    gradient background with mild noise. ``label_maps[i]`` [image_size, image_size] holds the object
    index of each pixel (-1 = background). Images are square, so processors that resize or
    centre-crop to a square see the whole image and the maps stay aligned. Passages are the
    built-in ones (the text does not enter the degradation metrics). Deterministic in ``seed``.

    Example:
        >>> sorted(set(shapes_probe(9).image_labels))
        [0, 1, 2]
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    passages = default_passages()
    samples, labels, maps = [], [], []
    for i in range(num_samples):
        _, label_map, kind = _draw_shapes(i, seed, image_size)
        samples.append(
            ProbeSample(
                _ShapesImage(i, seed, image_size), passages[i % len(passages)], f"shapes/{i:03d}-{SHAPE_CLASSES[kind]}"
            )
        )
        labels.append(kind)
        maps.append(label_map)
    return LabelledProbe(Probe(samples, name=f"shapes (seed {seed})"), labels, list(SHAPE_CLASSES), maps)


def labels_from_names(probe: Any) -> tuple[list[int], list[str]] | None:
    """Image classes of the built-in default probe, read from its sample names ("default/007-chart");
    None when a name is not of that form."""
    names = [getattr(s, "name", "") for s in probe]
    kinds = [re.search(r"^default/\d+-(\w+)$", n) for n in names]
    if not names or not all(k and k.group(1) in DEFAULT_KINDS for k in kinds):
        return None
    return [DEFAULT_KINDS.index(k.group(1)) for k in kinds], list(DEFAULT_KINDS)


@dataclass
class LabelledSamples:
    """The pairs to encode and their labels, aligned (after the seeded subset), and the probe's name."""

    samples: list[Any]
    image_labels: list[int] | None
    class_names: list[str] | None
    label_maps: list[Any] | None
    name: str


def resolve_labelled(
    probe: Any, image_labels: Sequence[int] | None, label_maps: Sequence[Any] | None, num_samples: int | None, seed: int
) -> LabelledSamples:
    """Samples and labels from the probe arguments (explicit labels win over the probe's own)."""
    class_names = None
    if probe is None:
        probe = shapes_probe(num_samples or 60, seed)
    if isinstance(probe, LabelledProbe):
        samples, name = list(probe.probe), probe.probe.name
        image_labels = probe.image_labels if image_labels is None else image_labels
        label_maps = probe.label_maps if label_maps is None else label_maps
        class_names = probe.class_names
    else:
        samples = list(probe.samples if isinstance(probe, Probe) else probe)
        name = getattr(probe, "name", None) or f"{len(samples)} pairs"
        named = labels_from_names(samples) if image_labels is None else None
        if named is not None:
            image_labels, class_names = named
    for what, values in (("image_labels", image_labels), ("label_maps", label_maps)):
        if values is not None and len(values) != len(samples):
            raise ValueError(f"{what} has {len(values)} entries for {len(samples)} probe pairs")
    keep = sample_indices(len(samples), num_samples, seed)
    return LabelledSamples(
        [samples[i] for i in keep],
        None if image_labels is None else [image_labels[i] for i in keep],
        class_names,
        None if label_maps is None else [label_maps[i] for i in keep],
        name if len(keep) == len(samples) else f"{name}, {len(keep)} of {len(samples)} (seed {seed})",
    )
