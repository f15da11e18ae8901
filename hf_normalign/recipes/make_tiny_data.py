"""A tiny LLaVA-style data set (PNG shapes with captions and short Q&A), and optionally a tiny model to train.

Offline, deterministic, a second or two::

    python -m hf_normalign.recipes.make_tiny_data tiny --num-samples 32 --model llava
    # tiny/data.json, tiny/images/00000.png ..., tiny/model/ (tiny LLaVA + processor, save_pretrained)

    from hf_normalign.recipes.make_tiny_data import make_tiny_data
    json_path = make_tiny_data("tiny", num_samples=32)

Every ``multi_turn_every``-th row is a two-question conversation; the others are single captions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Any

from hf_normalign.cli_types import positive_int

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")


def _draw(rng: random.Random, shape: str, color: str, background: str) -> Any:
    from PIL import Image, ImageDraw

    width, height = rng.randint(24, 48), rng.randint(24, 48)  # processors resize to their tile anyway
    image = Image.new("RGB", (width, height), COLORS[background])
    draw = ImageDraw.Draw(image)
    box = (width // 5, height // 5, width - width // 5, height - height // 5)
    if shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    elif shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLORS[color])
    return image


def make_tiny_data(
    directory: str | os.PathLike,
    *,
    num_samples: int = 32,
    seed: int = 0,
    multi_turn_every: int = 4,
    model: str | None = None,
) -> str:
    """Write ``directory/data.json`` and ``directory/images/*.png``; return the JSON path.

    ``model`` (a tiny family such as ``"llava"``) also saves ``hf_normalign.testing.tiny_model`` and its
    processor to ``directory/model``, ready for ``--model_name_or_path``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    directory = os.fspath(directory)
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(num_samples):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        background = rng.choice([c for c in COLORS if c != color])
        name = f"images/{i:05d}.png"
        _draw(rng, shape, color, background).save(os.path.join(directory, name))
        if multi_turn_every and i % multi_turn_every == multi_turn_every - 1:
            turns = [
                ("human", "<image>\nwhat color is the shape?"),
                ("gpt", f"{color}."),
                ("human", "and what is the shape?"),
                ("gpt", f"a {shape}."),
            ]
        else:
            caption = f"a {color} {shape} on a {background} background."
            turns = [("human", "<image>\ndescribe the image."), ("gpt", caption)]
        rows.append({"id": f"{i:05d}", "image": name, "conversations": [{"from": f, "value": v} for f, v in turns]})
    json_path = os.path.join(directory, "data.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    if model is not None:
        save_tiny_model(os.path.join(directory, "model"), model)
    return json_path


def save_tiny_model(directory: str | os.PathLike, family: str = "llava", seed: int = 0) -> str:
    """Save ``tiny_model(family)`` and ``tiny_processor(family)`` to ``directory``; return it.

    Families whose tiny processor has no video processor attached (llava, llava_next, gemma3, idefics3,
    paligemma) can be saved; the others raise ``NotImplementedError``.
    """
    from hf_normalign.testing import tiny_model, tiny_processor

    processor = tiny_processor(family)
    if any(getattr(processor, name, False) is None for name in getattr(processor, "get_attributes", list)()):
        raise NotImplementedError(
            f"the tiny {family} processor lacks its video processor (torchvision), so it cannot be saved; "
            "use llava, llava_next, gemma3, idefics3 or paligemma"
        )
    directory = os.fspath(directory)
    tiny_model(family, seed=seed).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_normalign.recipes.make_tiny_data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("directory", help="output directory (data.json, images/, model/)")
    parser.add_argument("--num-samples", type=positive_int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--multi-turn-every", type=int, default=4, help="every N-th row is multi-turn (0: none)")
    parser.add_argument("--model", metavar="FAMILY", help="also save a tiny model + processor of this family")
    args = parser.parse_args(argv)
    if args.model is not None:  # checked before anything is written (the families' list imports torch: not in --help)
        from hf_normalign.testing import TINY_FAMILIES

        if args.model not in TINY_FAMILIES:
            parser.error(f"--model: unknown family {args.model!r}; choose from {', '.join(TINY_FAMILIES)}")
    path = make_tiny_data(
        args.directory,
        num_samples=args.num_samples,
        seed=args.seed,
        multi_turn_every=args.multi_turn_every,
        model=args.model,
    )
    print(f"Wrote {path} ({args.num_samples} rows)" + (f" and {args.directory}/model" if args.model else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
