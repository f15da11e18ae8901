"""The demo's synthetic captioning task: one coloured shape at one position, and the text the LLM learns from.

Every image shows one shape (circle, square, triangle, cross) in one colour at one of five positions on a
noisy dark background; its caption follows from the image alone::

    a red circle at the top left .
    a cyan cross at the center .

Size, exact placement, rotation (triangles), colour shade and background vary from image to image, so two
images with the same caption still differ. A held-out split has new images of every kind, plus images of
colour-shape-position combinations that never appear in training (every single attribute value does).

Text side: a word-level tokenizer over the caption words and a small filler vocabulary, and a text-only
corpus for the LLM's pre-training (see :func:`pretraining_corpus`) and for the MIR probe passages.

Example:
    >>> split = make_splits(seed=0, num_train=8, num_heldout=4)
    >>> split.train[0].caption.startswith("a ")
    True
    >>> split.train[0].image().size
    (64, 64)
    >>> tokenizer = build_tokenizer()
    >>> tokenizer.decode(tokenizer("a red circle at the top left .").input_ids, skip_special_tokens=True)
    'a red circle at the top left .'
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "ATTRIBUTE_WORDS",
    "COLOURS",
    "IMAGE_TOKEN",
    "POSITIONS",
    "SHAPES",
    "Scene",
    "Split",
    "attribute_token_ids",
    "build_tokenizer",
    "caption",
    "draw_scene",
    "make_splits",
    "passages",
    "pretraining_corpus",
    "vocabulary",
]

IMAGE_SIZE = 64  # drawn at 64 px; the image processor resizes to the vision tower's tile
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)  # ids 0..4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 40),
    "purple": (150, 50, 200),
    "cyan": (40, 210, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Position phrase -> centre as a fraction of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
# The words a caption's correctness hinges on, by attribute (the rest is the fixed template "a ... at the ...").
ATTRIBUTE_WORDS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": tuple(sorted({w for p in POSITIONS for w in p.split()})),
}

# Filler vocabulary for text that is not a caption (pre-training and probe passages).
_SUBJECTS = ("the man", "the woman", "a child", "the dog", "my friend", "the teacher", "a farmer", "the cat",
             "our neighbour", "the driver", "a student", "the old man")  # fmt: skip
_VERBS = ("sees", "likes", "paints", "finds", "carries", "buys", "moves", "cleans", "draws", "sells", "opens",
          "holds")  # fmt: skip
_OBJECTS = ("box", "car", "ball", "door", "house", "boat", "chair", "kite", "book", "lamp", "cup", "flag", "road",
            "window", "garden", "river")  # fmt: skip
_ADJECTIVES = ("small", "big", "old", "new", "bright", "dark", "heavy", "round", *COLOURS)
_PLACES = ("near the river", "in the garden", "on the hill", "by the road", "at the market", "in the house",
           "under the tree", "at the station", "in the morning", "after dinner")  # fmt: skip
_CONNECTIVES = ("then", "later", "so", "and then", "after that", "because of the rain", "on sunday")


@dataclass(frozen=True)
class Scene:
    """One image of the task: its attributes and the seed of its drawing details.

    Example:
        >>> scene = Scene("red", "circle", "top left", seed=7)
        >>> scene.caption
        'a red circle at the top left .'
    """

    colour: str
    shape: str
    position: str
    seed: int

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.position)

    @property
    def combination(self) -> tuple[str, str, str]:
        return self.colour, self.shape, self.position

    def image(self, size: int = IMAGE_SIZE) -> Image.Image:
        """The drawn RGB image (deterministic in ``seed``)."""
        return draw_scene(self, size)


def caption(colour: str, shape: str, position: str) -> str:
    """The caption of a scene: ``"a {colour} {shape} at the {position} ."``."""
    return f"a {colour} {shape} at the {position} ."


def draw_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene``: the shape over a noisy dark background, with per-image jitter in size, place and shade."""
    rng = np.random.default_rng(scene.seed)
    base = rng.integers(10, 70)
    background = np.clip(base + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(background)
    fx, fy = POSITIONS[scene.position]
    cx = (fx + rng.uniform(-0.05, 0.05)) * size
    cy = (fy + rng.uniform(-0.05, 0.05)) * size
    r = rng.uniform(0.13, 0.19) * size
    colour = tuple(int(c) for c in np.clip(np.array(COLOURS[scene.colour]) + rng.integers(-25, 26, 3), 0, 255))
    draw = ImageDraw.Draw(img)
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif scene.shape == "square":
        s = r * 0.9  # same area scale as the circle, roughly
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif scene.shape == "triangle":
        turn = rng.uniform(-0.3, 0.3)  # a slight rotation, pointing up
        corners = [(cx + r * math.sin(turn + k * 2 * math.pi / 3), cy - r * math.cos(turn + k * 2 * math.pi / 3))
                   for k in range(3)]  # fmt: skip
        draw.polygon(corners, fill=colour)
    elif scene.shape == "cross":
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; the shapes are {SHAPES}")
    return img


@dataclass(frozen=True)
class Split:
    """Train and held-out scenes, and the combinations kept out of training.

    ``heldout`` mixes new images of trained combinations with images of ``unseen_combinations``.
    """

    train: list[Scene]
    heldout: list[Scene]
    unseen_combinations: frozenset[tuple[str, str, str]]


def make_splits(seed: int, num_train: int, num_heldout: int, *, unseen_fraction: float = 0.1) -> Split:
    """Draw the train and held-out scenes.

    ``unseen_fraction`` of all colour-shape-position combinations never occur in training; they make up about a
    third of the held-out images (the rest are new images of trained combinations). Every colour, shape and
    position still occurs in training. Image seeds never repeat between or within the splits.

    Example:
        >>> split = make_splits(seed=0, num_train=100, num_heldout=30)
        >>> any(s.combination in split.unseen_combinations for s in split.train)
        False
    """
    rng = random.Random(seed)
    combos = list(itertools.product(COLOURS, SHAPES, POSITIONS))
    rng.shuffle(combos)
    num_unseen = round(unseen_fraction * len(combos))
    unseen, seen = combos[:num_unseen], combos[num_unseen:]
    for values in (COLOURS, SHAPES, POSITIONS):  # each value must still be learnable from training data
        missing = set(values) - {v for c in seen for v in c}
        if missing:
            raise ValueError(f"unseen_fraction={unseen_fraction} leaves {sorted(missing)} out of training")
    image_seeds = iter(rng.sample(range(2**31), num_train + num_heldout))
    train = [Scene(*rng.choice(seen), seed=next(image_seeds)) for _ in range(num_train)]
    heldout = [
        Scene(*rng.choice(unseen if unseen and i % 3 == 0 else seen), seed=next(image_seeds))
        for i in range(num_heldout)
    ]
    return Split(train, heldout, frozenset(unseen))


# ----------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------


def _filler_sentence(rng: random.Random) -> str:
    subject, verb, obj = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
    adjective = f"{rng.choice(_ADJECTIVES)} " if rng.random() < 0.6 else ""
    place = f" {rng.choice(_PLACES)}" if rng.random() < 0.5 else ""
    lead = f"{rng.choice(_CONNECTIVES)} " if rng.random() < 0.25 else ""
    return f"{lead}{subject} {verb} the {adjective}{obj}{place} ."


def _random_caption(rng: random.Random) -> tuple[str, str, str, str]:
    colour, shape, position = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
    return colour, shape, position, caption(colour, shape, position)


def pretraining_corpus(seed: int, num_lines: int) -> list[str]:
    """Text-only lines the LLM is pre-trained on, a third of each kind:

    - filler prose (``"the man paints the red boat near the river ."``), one to three sentences;
    - captions (``"a blue square at the center ."``), over every combination (there are no images here, so
      none is "held out");
    - "notes then caption": the caption's content words in random order, then the caption
      (``"left cross top green a green cross at the top left ."``). This is the one skill the demo hands the
      LLM on purpose: writing a caption from facts mentioned earlier in any order. A real LLM brings it from
      web text; stage-1 alignment then has to make the image tokens read as such facts, which is the job
      the projector, and the methods under test, are trained for.

    Example:
        >>> len(pretraining_corpus(seed=0, num_lines=6))
        6
    """
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        kind = i % 3
        if kind == 0:
            lines.append(" ".join(_filler_sentence(rng) for _ in range(rng.randint(1, 3))))
        elif kind == 1:
            lines.append(_random_caption(rng)[3])
        else:
            colour, shape, position, text = _random_caption(rng)
            notes = [colour, shape, *position.split()]
            rng.shuffle(notes)
            lines.append(f"{' '.join(notes)} {text}")
    rng.shuffle(lines)
    return lines


def passages(seed: int, num_passages: int, sentences: int = 4) -> list[str]:
    """Text passages for the MIR probe: filler prose unrelated to the images, as in the MIR paper's probe.

    Example:
        >>> passages(seed=1, num_passages=2)[0].endswith(".")
        True
    """
    rng = random.Random(seed)
    return [" ".join(_filler_sentence(rng) for _ in range(sentences)) for _ in range(num_passages)]


def vocabulary() -> list[str]:
    """Every word the task and the filler text use (punctuation included), sorted."""
    words = {"a", "at", "the", "."}
    for group in (_SUBJECTS, _VERBS, _OBJECTS, _ADJECTIVES, _PLACES, _CONNECTIVES, COLOURS, SHAPES, POSITIONS):
        for phrase in group:
            words.update(phrase.split())
    return sorted(words)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer over :func:`vocabulary`, built in memory.

    Ids: 0 ``<pad>``, 1 ``<s>`` (prepended), 2 ``</s>``, 3 ``<unk>``, 4 ``<image>``, then the words. The
    image token is exposed as ``tokenizer.image_token`` (what ``LlavaProcessor`` looks up).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words, and punctuation as separate tokens
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    backend.add_special_tokens([AddedToken(tok, normalized=False, special=True) for tok in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def attribute_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, list[int]]:
    """Token ids of each attribute's words (see :data:`ATTRIBUTE_WORDS`)."""
    return {name: tokenizer.convert_tokens_to_ids(list(words)) for name, words in ATTRIBUTE_WORDS.items()}
