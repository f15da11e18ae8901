"""Projector LayerNorm with Global Weight Compensation (arXiv 2512.08374)."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `scale` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


class ProjectorLayerNorm(nn.LayerNorm):
    """LayerNorm(D) on the vision tokens, in fp32, with GWC.

    The gain starts at ``target_norm / sqrt(D)`` so normalised tokens start at the text-embedding
    norm. GWC multiplies the gradient w.r.t. the normalised input by ``1 / max(mean|gain|, floor)``
    in training only: the small gain would otherwise shrink the projector's gradient by ~50x.
    Gain and bias gradients are untouched because the scaling sits before the affine step.
    """

    def __init__(self, hidden_size: int, *, target_norm: float, gwc: bool, gwc_floor: float, eps: float):
        super().__init__(hidden_size, eps=eps, dtype=torch.float32)
        self.gwc = gwc
        self.gwc_floor = gwc_floor
        with torch.no_grad():
            self.weight.fill_(target_norm / hidden_size**0.5)
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = F.layer_norm(x.float(), self.normalized_shape, None, None, self.eps)
        if self.gwc and self.training and torch.is_grad_enabled():
            scale = 1.0 / self.weight.detach().abs().mean().clamp_min(self.gwc_floor)
            x_hat = _ScaleGrad.apply(x_hat, scale)
        return (x_hat * self.weight + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gwc={self.gwc}, gwc_floor={self.gwc_floor}"


# --- wiring (the protocol of hf_normalign.methods) ---------------------------------------------------------------


def _projectors(plugin: nn.Module, target: Any) -> list[nn.Module]:
    """The main projector, then (``deepstack``, Qwen3-VL) the mergers whose outputs reach later layers."""
    return [target.projector, *(target.extra_projectors if plugin.config.projector_norm.deepstack else [])]


def build(plugin: nn.Module, target: Any, *, init_weights: bool = True) -> None:
    config = plugin.config.projector_norm
    devices = [target.device_of(p) for p in _projectors(plugin, target)]  # first: embedding_scale reads weights
    norm = config.target_norm
    if norm is None:
        # Without init the gain is a placeholder the caller overwrites with saved weights.
        norm = target.embedding_scale() if init_weights else 1.0
    plugin.projector_norm = nn.ModuleList(
        ProjectorLayerNorm(
            target.hidden_size, target_norm=norm, gwc=config.gwc, gwc_floor=config.gwc_floor, eps=config.eps
        ).to(device)
        for device in devices
    )


def attach(plugin: nn.Module, target: Any) -> None:
    for index, projector in enumerate(_projectors(plugin, target)):
        plugin.add_hook(projector, "forward", functools.partial(_projector_hook, index))


def _projector_hook(index, ref, module, args, output):
    norm = ref().projector_norm[index]
    if isinstance(output, torch.Tensor):
        return norm(output)
    return (norm(output[0]), *output[1:])
