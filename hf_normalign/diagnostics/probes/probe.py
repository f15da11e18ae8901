"""Probe sets for the diagnostics: image-text pairs, image i paired with text i.

Three sources:

- :func:`default_probe`: built offline by the project. Images are drawn procedurally and
  deterministically from a seed (documents, charts and scene-like pictures, in turn); the texts are
  100 short news-like passages written for this project (``probe_data/passages.txt``, fictional
  places and people), so the probe needs no download and is the same on every machine.
- :func:`~.loading.load_probe`: your own image folder plus a text file or folder.
- :func:`~.loading.probe_from_dataset`: a HF ``datasets`` dataset with an image and a text column.

This module holds the probe types, the seeded subsets and the default probe; its images are drawn by
:mod:`.drawing`, the loaders are in :mod:`.loading`.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from PIL import Image

from .drawing import DrawnImage
from .passages import default_passages

__all__ = [
    "DEFAULT_KINDS",
    "DEFAULT_PROBE_SIZE",
    "IMAGE_EXTENSIONS",
    "Probe",
    "ProbeSample",
    "default_passages",
    "default_probe",
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
        ProbeSample(DrawnImage(i, seed, image_size), text, f"default/{i:03d}-{DEFAULT_KINDS[i % 3]}")
        for i, text in enumerate(passages)
    ]
    probe = Probe(samples, name=f"default (seed {seed})")
    return probe.sample(num_samples, seed) if num_samples < len(passages) else probe
