"""The plugin's modules inside vLLM: projector LayerNorm, MoCa in its fused serving form, the per-step vision mask.

Free of vLLM imports (tested in the main environment, tests/test_serving_checkpoint.py); ``models.py`` attaches it
to vLLM's model classes::

    modules = NormAlignServingModules(checkpoint, max_num_tokens=8192)
    modules.load_state_dict(tensors); modules.prepare(torch.bfloat16)
    layer.register_forward_hook(modules.calibrate_hook("layer_3_norm"))
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import checkpoint as ckpt
from . import core


class NormAlignServingModules(nn.Module):
    """The inference plugin modules, named as in ``normalign.safetensors``, plus the per-step vision mask.

    MoCa is served in the fused form ``h + mask * ((u - 1) * h + v)`` with a float 0/1 mask: one multiply-add
    pair that torch.compile fuses into the layer's epilogue, no select, and text rows returned unchanged
    (``h + 0``). ``u - 1`` and ``v`` are derived once after loading (:meth:`prepare`), in the model dtype, so no
    step casts; ``u - 1`` keeps the small calibration exactly where a bf16 ``u`` near 1 would round it away.
    """

    def __init__(self, checkpoint: ckpt.ServingCheckpoint, max_num_tokens: int):
        super().__init__()
        config, hidden = checkpoint.config, checkpoint.hidden_size
        self.projector_norm: nn.ModuleList | None = None
        self.moca: nn.ModuleDict | None = None
        if config.projector_norm is not None:
            pn = config.projector_norm
            norm_cls = core.get("projector_norm", "ProjectorLayerNorm")
            # GWC acts on gradients only; the gain is overwritten by the saved weights.
            norm = norm_cls(hidden, target_norm=1.0, gwc=False, gwc_floor=pn.gwc_floor, eps=pn.eps)
            self.projector_norm = nn.ModuleList([norm])
        if config.moca is not None:
            layer_cls, key = core.get("moca", "MoCaLayer"), core.get("moca", "moca_key")
            self.moca = nn.ModuleDict({key(i): layer_cls(hidden) for i in checkpoint.moca_layers})
        # Fixed address, written before each step outside any compiled graph; [N, 1] broadcasts over D.
        self.register_buffer("vision_mask", torch.zeros(max_num_tokens, 1), persistent=False)
        self.fused: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.eval()

    @torch.no_grad()
    def prepare(self, dtype: torch.dtype) -> None:
        """After the weights are loaded: the fused MoCa terms ``(u - 1, v)`` and the mask in the model dtype."""
        self.vision_mask.data = self.vision_mask.to(dtype)
        for key, layer in (self.moca or {}).items():
            self.fused[key] = ((layer.scale - 1).to(dtype), layer.shift.to(dtype))

    def record_vision_positions(self, num_tokens: int, is_multimodal: torch.Tensor | None) -> None:
        """Remember which of this step's ``num_tokens`` flattened positions hold vision embeddings."""
        if num_tokens > self.vision_mask.shape[0]:
            raise RuntimeError(
                f"hf-normalign: a step of {num_tokens} tokens exceeds the {self.vision_mask.shape[0]} positions "
                "sized from max_num_batched_tokens at start-up. Please report this with your vLLM version."
            )
        self.vision_mask.zero_()
        if is_multimodal is not None:
            self.vision_mask[:num_tokens, 0].copy_(is_multimodal)

    def normalize(self, embeddings: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        return [self.projector_norm[0](rows) for rows in embeddings]

    def calibrate_hook(self, key: str):
        """Forward hook for the decoder layer of MoCa ``key``: the fused update, branch-free."""
        mask = self.vision_mask

        def hook(module, args, output):
            delta, shift = self.fused[key]
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = torch.addcmul(hidden, mask[: hidden.shape[-2]], torch.addcmul(shift, delta, hidden))
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook
