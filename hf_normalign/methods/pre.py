"""PRe: predictive regularisation of a middle layer's vision states (arXiv 2603.20808)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PReHead(nn.Module):
    """Linear(D, H) -> GELU -> Linear(H, D_anchor), in fp32. Training-only: inference never calls it."""

    def __init__(self, hidden_size: int, head_hidden_size: int, anchor_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, head_hidden_size, dtype=torch.float32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(head_hidden_size, anchor_size, dtype=torch.float32)

    def forward(self, vision_hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(vision_hidden.float())))


def pre_loss(head: PReHead, vision_hidden: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean over vision positions of ``1 - cos(head(h), sg(anchor))``."""
    prediction = head(vision_hidden)
    return (1.0 - F.cosine_similarity(prediction, anchor.detach().float(), dim=-1)).mean()


class InjectAuxLoss(torch.autograd.Function):
    """Identity on `hidden`; its backward also back-propagates ``coef * aux_loss``.

    Placed on a tensor every loss depends on (a decoder layer's output), it delivers the PRe
    gradient to a trainer that builds its own loss from the logits and ignores `outputs.loss`.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux_loss: torch.Tensor, coef: float) -> torch.Tensor:
        ctx.coef = coef
        ctx.loss_meta = (aux_loss.dtype, aux_loss.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        dtype, device = ctx.loss_meta
        return grad, torch.full((), ctx.coef, dtype=dtype, device=device), None
