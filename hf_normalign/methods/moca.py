"""MoCa: learnable modality calibration of vision positions (arXiv 2410.07167)."""

from __future__ import annotations

import torch
from torch import nn


class MoCaLayer(nn.Module):
    """``h <- scale * h + shift`` on the vision rows of one decoder layer's output, in fp32."""

    def __init__(self, hidden_size: int, *, init_std: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))
        self.shift = nn.Parameter(torch.zeros(hidden_size, dtype=torch.float32))
        if init_std > 0:
            with torch.no_grad():
                self.scale.add_(torch.randn(hidden_size, generator=generator) * init_std)
                self.shift.add_(torch.randn(hidden_size, generator=generator) * init_std)

    def forward(self, vision_hidden: torch.Tensor) -> torch.Tensor:
        return (vision_hidden.float() * self.scale + self.shift).to(vision_hidden.dtype)


def moca_key(layer_idx: int) -> str:
    # The "_norm" suffix puts MoCa under the HF Trainer's no-weight-decay name pattern
    # (`_norm(?:$|\.)`); the paper trains u, v without decay.
    return f"layer_{layer_idx}_norm"
