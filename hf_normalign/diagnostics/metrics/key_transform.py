"""Keys in the ``"post_norm"`` and ``"post_rope"`` key spaces (:mod:`.keyspace`) from captured ``k_proj`` rows,
with the attention's own ``k_norm`` and ``apply_rotary_pos_emb``."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ...model_view import ModelView

__all__ = ["KeyTransform"]


class KeyTransform:
    """Turns captured ``k_proj`` rows into the keys of ``space`` ("post_norm" or "post_rope").

    Forward pre-hooks on the selected attention modules record the dtype of the hidden states each one
    receives and its ``position_embeddings`` (nothing is changed). After the batch, each row goes back to
    that dtype and through the attention's own ``k_norm`` (when it has one) and, for "post_rope", the
    ``apply_rotary_pos_emb`` of the attention's transformers module at the row's (batch row, position):
    the same operations attention applies, on the selected rows only.
    """

    def __init__(self, view: ModelView, layers: Sequence[int], samples: Sequence[Any], space: str) -> None:
        decoder = view.layers
        self.space = space
        self.attentions = {k: decoder[k - 1].self_attn for k in layers}
        self.normed = [k for k, attn in self.attentions.items() if getattr(attn, "k_norm", None) is not None]
        self.seen: dict[int, tuple[torch.dtype, Any]] = {}
        ids = torch.tensor(view.vision_token_ids)
        # Positions of the vision / text rows of every sample, in the order capture yields them.
        self.vision_pos = [
            (torch.isin(s.input_ids, ids) & s.inputs.get("attention_mask", torch.ones(1, 1))[0].bool())
            .nonzero()
            .squeeze(1)
            for s in samples
        ]
        self.text_pos = [s.text_mask.nonzero().squeeze(1) for s in samples]

    def describe(self) -> str:
        """What the keys are, for ``settings["keys"]``."""
        if not self.normed:
            norm = "this model's attention has no k_norm, so nothing is normalised"
        elif len(self.normed) == len(self.attentions):
            norm = "after self_attn.k_norm (per head)"
        else:
            norm = f"after self_attn.k_norm on layers {self.normed} (the others have none)"
        if self.space == "post_norm":
            what = "equal to the k_proj output" if not self.normed else "k_proj output"
            return f"post_norm: {what}, {norm}, before RoPE; all KV heads concatenated"
        return (
            f"post_rope: k_proj output, {norm}, then RoPE by the model's own apply_rotary_pos_emb with the "
            "position embeddings attention receives (the keys attention compares); all KV heads concatenated"
        )

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        def record(layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.seen[layer] = (hidden.dtype, kwargs.get("position_embeddings", args[1] if len(args) > 1 else None))

        handles = [
            attn.register_forward_pre_hook(lambda m, a, kw, layer=layer: record(layer, m, a, kw), with_kwargs=True)
            for layer, attn in self.attentions.items()
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _positions(batch: Any, sample: torch.Tensor, index: torch.Tensor, table: list[torch.Tensor]):
        """(batch row, unpadded position) of every captured row. Capture pads on the right (the runner's
        default), so a row keeps its unpadded position."""
        row_of = {s: r for r, s in enumerate(batch.sample_indices)}
        pos = torch.empty_like(index)
        for s in sample.unique().tolist():
            rows = sample == s
            pos[rows] = table[s][index[rows]]
        return torch.tensor([row_of[s] for s in sample.tolist()], dtype=torch.long), pos

    def _rows(self, layer: int, rows: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        attn = self.attentions[layer]
        dtype, position_embeddings = self.seen[layer]
        head_dim = getattr(attn, "head_dim", None) or attn.config.head_dim
        k = rows.to(dtype).view(rows.shape[0], -1, head_dim)  # [rows, kv heads, head_dim]
        if layer in self.normed:
            k = attn.k_norm(k.to(attn.k_norm.weight.device))
        if self.space == "post_rope":
            if position_embeddings is None:
                raise ValueError(f"keys='post_rope': decoder layer {layer}'s attention received no position_embeddings")
            rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
            if rope is None:
                raise ValueError(f"keys='post_rope': {type(attn).__module__} has no apply_rotary_pos_emb")
            cos, sin = position_embeddings
            b, pos = (t.to(cos.device) for t in where)
            b = b * (cos.shape[0] > 1)  # cos/sin of [1, L, dim] serve every batch row
            # [rows, dim] unsqueezed at dim 1 broadcasts over the heads, as [B, 1, L, dim] does in attention.
            _, k = rope(k.to(cos.device), k.to(cos.device), cos[b, pos], sin[b, pos], unsqueeze_dim=1)
        return k.reshape(rows.shape[0], -1).to(rows.dtype)

    def __call__(self, batch: Any) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """(vision keys, text keys) of a ``CaptureBatch`` in this key space."""
        vision = self._positions(batch, batch.vision_sample, batch.vision_patch, self.vision_pos)
        text = self._positions(batch, batch.text_sample, batch.text_token, self.text_pos)
        with torch.inference_mode():
            return (
                {k: self._rows(k, v, vision) for k, v in batch.vision_keys.items()},
                {k: self._rows(k, t, text) for k, t in batch.text_keys.items()},
            )
