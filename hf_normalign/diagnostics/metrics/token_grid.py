"""Where an image's vision tokens lie on the picture: the token grid from the family's spec
(``ArchitectureSpec.vision_grid``) and the object label of each captured vision row.

Example:
    >>> from hf_normalign.testing import tiny_model
    >>> token_grid(tiny_model("llava"), 16), token_grid(tiny_model("llava"), 15)
    ((0, 4, 4), None)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ...model_view import ModelView
from ..maths.degradation import patch_labels_for_grid

__all__ = ["batch_patch_labels", "token_grid"]


def token_grid(model: nn.Module | ModelView, n_tokens: int) -> tuple[int, int, int] | None:
    """(first token, rows, cols) of the row-major grid of vision tokens covering the whole image, from the
    family's ``ArchitectureSpec.vision_grid``; None when the layout is unknown.

    ``"overview_tile"`` (LLaVA-NeXT / OneVision): the overview tile of (image_size / patch_size)^2 tokens comes
    first, then the high-res tiles (the total may happen to be square as well). ``"square"``: a square count
    is a square grid (LLaVA, Qwen-VL on square images, InternVL, Gemma3, PaliGemma, Idefics3 / SmolVLM without
    image splitting, Mistral3); anything else is unknown. Checked on every tiny family by perturbing one image
    quadrant (tests/test_degradation.py).

    """
    view = ModelView.of(model)  # a view passes as it is (the degradation run resolves the model once)
    if view.spec.vision_grid == "overview_tile":
        vision = view.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return (0, side, side) if side * side <= n_tokens else None
    side = math.isqrt(n_tokens)
    return (0, side, side) if side * side == n_tokens else None


def batch_patch_labels(
    sample: torch.Tensor,
    patch: torch.Tensor,
    maps: Sequence[Any],
    grid_of: Callable[[int], tuple[int, int, int] | None],
    min_coverage: float,
) -> torch.Tensor | None:
    """Object label of every vision row of a batch (``sample`` [rows]: probe index, ``patch`` [rows]: index of the
    token in its sample) from each sample's label map; -1 outside the grid; None if a layout is unknown."""
    out = torch.full_like(patch, -1)
    for s in sample.unique().tolist():
        rows = (sample == s).nonzero().squeeze(1)
        grid = grid_of(int(rows.shape[0]))
        if grid is None:
            return None
        first, r, c = grid
        cells = torch.as_tensor(patch_labels_for_grid(maps[s], r, c, min_coverage=min_coverage))
        within = patch[rows] - first
        inside = (within >= 0) & (within < r * c)
        out[rows[inside]] = cells[within[inside]]
    return out
