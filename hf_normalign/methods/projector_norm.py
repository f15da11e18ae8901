"""Projector LayerNorm with Global Weight Compensation (arXiv 2512.08374)."""

from __future__ import annotations

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
