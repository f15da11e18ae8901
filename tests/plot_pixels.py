"""Pixel checks of matplotlib figures: is a colour drawn inside a given artist's box (axes or legend)?"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.colors import to_rgb

from hf_normalign.diagnostics import plots


def render(fig: Any) -> np.ndarray:
    """The figure as drawn for the report (at plots.DPI), RGB int16 [height, width, 3]."""
    fig.set_dpi(plots.DPI)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.int16)


def pixels_of(image: np.ndarray, artist: Any, colour: Any, tolerance: int = 30) -> int:
    """How many pixels inside ``artist``'s window box are within ``tolerance`` (per channel) of ``colour``."""
    box = artist.get_window_extent()
    height = image.shape[0]
    x0, x1 = int(box.x0) + 1, int(box.x1) - 1
    y0, y1 = height - int(box.y1) + 1, height - int(box.y0) - 1  # display y grows upwards
    crop = image[y0:y1, x0:x1]
    rgb = np.array([round(255 * c) for c in to_rgb(colour)], dtype=np.int16)
    return int((np.abs(crop - rgb).max(axis=-1) <= tolerance).sum())
