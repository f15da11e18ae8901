"""MoCa: learnable modality calibration of vision positions (arXiv 2410.07167)."""

from __future__ import annotations

from typing import Any

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


# --- wiring (the protocol of hf_normalign.methods) ---------------------------------------------------------------


def layer_indices(plugin: nn.Module, target: Any) -> list[int]:
    layers = plugin.config.moca.layers
    return list(range(len(target.layers))) if layers is None else list(layers)


def build(plugin: nn.Module, target: Any, *, init_weights: bool = True) -> None:
    indices, num_layers = layer_indices(plugin, target), len(target.layers)
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"MoCaConfig.layers names layers {bad}, but the model has {num_layers} decoder layers "
            f"(valid: 0..{num_layers - 1})."
        )
    init_std = plugin.config.moca.init_std
    generator = torch.Generator().manual_seed(0)  # the same initial u, v for every model of this size
    plugin.moca = nn.ModuleDict(
        {
            moca_key(i): MoCaLayer(target.hidden_size, init_std=init_std, generator=generator).to(
                target.device_of(target.layers[i])
            )
            for i in indices
        }
    )


def at_layer(
    plugin: nn.Module, layer_idx: int, hidden: torch.Tensor, vision_mask: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    return plugin.moca[moca_key(layer_idx)](hidden, vision_mask)
