"""A tiny family: its recipe (`ArchitectureSpec.tiny`, in `hf_normalign.specs`) and the layout rules the
recipe names: placeholders per image, the token layout of an image block, pixel inputs.

Counting is analytic for tile-sized images; the tests check every family by running a forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..spec import TinyRecipe
from ..specs import SPECS
from ..specs._tiny import IMAGE_ID, IMG_END_ID, IMG_SEP_ID, IMG_START_ID

if TYPE_CHECKING:
    from transformers import PretrainedConfig

QWEN_GRID = (1, 4, 4)  # (t, h, w) patches of one still image -> 4x4 / merge 2x2 = 4 LLM tokens

RECIPES: dict[str, TinyRecipe] = {spec.model_type: spec.tiny for spec in SPECS if spec.tiny is not None}
TINY_FAMILIES: tuple[str, ...] = tuple(RECIPES)


def recipe(family: str) -> TinyRecipe:
    """The tiny recipe of ``family`` (a ``model_type``); a clear error for an unknown one."""
    if family not in RECIPES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {TINY_FAMILIES}")
    return RECIPES[family]


def _first(x: Any) -> int:
    return x[0] if isinstance(x, (list, tuple)) else x


@dataclass(frozen=True)
class Family:
    """A tiny family's recipe with the config it is applied to (a tiny config, or a model's own)."""

    recipe: TinyRecipe
    config: PretrainedConfig

    @property
    def tile(self) -> int:
        """Pixel side of one vision tile."""
        if self.recipe.pixels == "grid_thw":
            return QWEN_GRID[1] * self.config.vision_config.patch_size
        return _first(self.config.vision_config.image_size)

    @property
    def vit_side(self) -> int:
        return self.tile // _first(self.config.vision_config.patch_size)

    def image_tokens(self, n_images: int) -> int:
        """Placeholders per image when a sample holds ``n_images`` images."""
        return _IMAGE_TOKENS[self.recipe.image_tokens](self, n_images)

    def image_block(self, n: int) -> list[int]:
        """The ids of one image block holding ``n`` placeholders."""
        return _IMAGE_BLOCKS[self.recipe.image_block](n)

    def pixels(self, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Random pixel inputs of ``b`` samples with ``n`` images each."""
        return _PIXELS[self.recipe.pixels](self, b, n, gen)


def _n_vit(f: Family, n_images: int) -> int:
    # One token per patch; a CLS token survives only the "full" feature strategy (SigLIP has none).
    cls = f.recipe.vision_cls and f.config.vision_feature_select_strategy == "full"
    return f.vit_side**2 + int(cls)


def _n_anyres(f: Family, n_images: int) -> int:
    # A tile-sized image picks the 1x1 pinpoint: overview tile + one high-res tile with a newline per row.
    return _n_vit(f, n_images) + f.vit_side * (f.vit_side + 1)


def _n_anyres_overview(f: Family, n_images: int) -> int:
    # LLaVA-OneVision feeds only the overview tile (+1 newline) when a sample holds several images.
    return _n_vit(f, n_images) + 1 if n_images > 1 else _n_anyres(f, n_images)


_IMAGE_TOKENS = {
    "vit": _n_vit,
    "anyres": _n_anyres,
    "anyres_overview": _n_anyres_overview,
    "merged_grid": lambda f, n: math.prod(QWEN_GRID) // f.config.vision_config.spatial_merge_size**2,
    "shuffled": lambda f, n: int(f.vit_side**2 * f.config.downsample_ratio**2),  # pixel shuffle shrinks the grid
    "fixed": lambda f, n: f.config.mm_tokens_per_image,  # average-pooled to a fixed count
    "scaled": lambda f, n: f.vit_side**2 // f.config.scale_factor**2,
    "merged": lambda f, n: (f.vit_side // f.config.spatial_merge_size) ** 2,
}


def _block_pixtral(n: int) -> list[int]:
    # Pixtral: [IMG_BREAK] after each row of merged patches, the last one replaced by [IMG_END].
    side = math.isqrt(n)
    ids = ([IMAGE_ID] * side + [IMG_SEP_ID]) * side
    ids[-1] = IMG_END_ID
    return ids


_IMAGE_BLOCKS = {
    "plain": lambda n: [IMAGE_ID] * n,
    # Qwen <|vision_start|>..<|vision_end|>, InternVL <img>..</img>, Gemma3 <start_of_image>..<end_of_image>.
    "wrapped": lambda n: [IMG_START_ID, *[IMAGE_ID] * n, IMG_END_ID],
    # Idefics3Processor without image splitting: <fake_token_around_image><global-img><image>*n<fake...>.
    "idefics": lambda n: [IMG_START_ID, IMG_SEP_ID, *[IMAGE_ID] * n, IMG_START_ID],
    "pixtral": _block_pixtral,
}


def _pix_flat(f: Family, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(b * n, 3, f.tile, f.tile, generator=gen)}


def _pix_sized(f: Family, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {**_pix_flat(f, b, n, gen), "image_sizes": torch.tensor([[f.tile, f.tile]] * (b * n))}


def _pix_anyres(f: Family, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # (images, tiles, C, H, W): tile 0 is the overview, tile 1 the 1x1 high-res grid.
    return {
        "pixel_values": torch.randn(b * n, 2, 3, f.tile, f.tile, generator=gen),
        "image_sizes": torch.tensor([[f.tile, f.tile]] * (b * n)),
    }


def _pix_anyres_batched(f: Family, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {**_pix_anyres(f, b, n, gen), "batch_num_images": torch.tensor([n] * b)}


def _pix_grid_thw(f: Family, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # Flattened patches: (sum of t*h*w, C * temporal_patch * patch^2) plus each image's (t, h, w) grid.
    v = f.config.vision_config
    dim = 3 * v.temporal_patch_size * v.patch_size**2
    return {
        "pixel_values": torch.randn(b * n * math.prod(QWEN_GRID), dim, generator=gen),
        "image_grid_thw": torch.tensor([QWEN_GRID] * (b * n)),
    }


def _pix_tiled(f: Family, b: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.randn(b, n, 3, f.tile, f.tile, generator=gen),
        "pixel_attention_mask": torch.ones(b, n, f.tile, f.tile, dtype=torch.bool),
    }


_PIXELS = {
    "flat": _pix_flat,
    "sized": _pix_sized,
    "anyres": _pix_anyres,
    "anyres_batched": _pix_anyres_batched,
    "grid_thw": _pix_grid_thw,
    "tiled": _pix_tiled,
}
