"""MoCa: learnable modality calibration of vision positions (arXiv 2410.07167)."""

from __future__ import annotations

import torch
from torch import nn


class MoCaLayer(nn.Module):
    """``h <- scale * h + shift`` on the vision positions of one decoder layer's output, in fp32."""

    def __init__(self, hidden_size: int, *, init_std: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))
        self.shift = nn.Parameter(torch.zeros(hidden_size, dtype=torch.float32))
        if init_std > 0:
            with torch.no_grad():
                self.scale.add_(torch.randn(hidden_size, generator=generator) * init_std)
                self.shift.add_(torch.randn(hidden_size, generator=generator) * init_std)

    def forward(self, hidden: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
        """`hidden` [batch, seq, D]; `vision_mask` [batch, seq]. Text positions are returned bit-identical.

        A `where` over the whole sequence instead of gathering the vision rows: no data-dependent shapes, so
        the same code runs eagerly, under `torch.compile(fullgraph=True)` and on decode steps (mask all False).
        """
        calibrated = (hidden.float() * self.scale + self.shift).to(hidden.dtype)
        return torch.where(vision_mask.unsqueeze(-1), calibrated, hidden)


def moca_key(layer_idx: int) -> str:
    # The "_norm" suffix puts MoCa under the HF Trainer's no-weight-decay name pattern
    # (`_norm(?:$|\.)`); the paper trains u, v without decay.
    return f"layer_{layer_idx}_norm"
