"""PRe: predictive regularisation of a middle layer's vision states (arXiv 2603.20808)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PReHead(nn.Module):
    """Linear(D, H) -> GELU -> Linear(H, D_anchor), in fp32 (also under autocast). Training-only."""

    def __init__(self, hidden_size: int, head_hidden_size: int, anchor_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, head_hidden_size, dtype=torch.float32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(head_hidden_size, anchor_size, dtype=torch.float32)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Autocast (bf16/fp16 mixed precision, TRL's default) would run these Linears in half precision.
        with torch.autocast(hidden.device.type, enabled=False):
            return self.fc2(self.act(self.fc1(hidden.float())))


def pre_loss(head: PReHead, hidden: torch.Tensor, anchor: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
    """Mean over vision positions of ``1 - cos(head(h), sg(anchor))``; exactly 0 without vision positions.

    `hidden` [batch, seq, D], `anchor` [batch, seq, D_anchor], `vision_mask` [batch, seq]. The head runs on
    every position and the mask weights the mean, so no shape depends on the data (compile-friendly).
    """
    cos = F.cosine_similarity(head(hidden), anchor.detach().float(), dim=-1)
    weights = vision_mask.to(cos.dtype)
    return ((1.0 - cos) * weights).sum() / weights.sum().clamp_min(1.0)


class InjectAuxLoss(torch.autograd.Function):
    """Identity on `hidden`; its backward also back-propagates ``coef * aux_loss``.

    Placed on a tensor every loss depends on (a decoder layer's output), it delivers the PRe gradient to a
    trainer that builds its own loss from the logits and ignores `outputs.loss`. `coef` is a 0-dim tensor
    holding ``weight * accumulation factor * loss scale``: under fp16 loss scaling the LM gradient arrives
    multiplied by the scale, so the injected one must be too.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux_loss: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coef)
        ctx.loss_dtype = aux_loss.dtype
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (coef,) = ctx.saved_tensors
        return grad, coef.to(ctx.loss_dtype), None
