"""One resolved view of a model: the wrapper a user holds, the transformers model inside it and its spec.

Every part of hf-normalign that acts on a model (patching and the methods, diagnostics, persistence, recipes)
resolves it once with :meth:`ModelView.of` and reads layers, vision ids, devices and submodules from the view,
instead of unwrapping the model and looking up its spec again.

Layer numbering (the index into ``outputs.hidden_states`` of transformers)::

    layer 0          the LLM input: token embeddings with the projected vision features in place
    layer k, 1..K    the output of decoder layer k (1-based; module ``layers[k - 1]``)

Negative numbers count from the end (-1 is K).

Example:
    >>> from hf_normalign.testing import tiny_model
    >>> view = ModelView.of(tiny_model("llava"))
    >>> view.num_layers, view.resolve_layers([-1]), view.resolve_layers([-1, 1], include_embeddings=True)
    (2, [2], [0, 1, 2])
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .modeling import get_base_model
from .registry import ArchitectureSpec, embedding_scale, get_spec

__all__ = ["ModelView"]


@dataclass(frozen=True, eq=False)
class ModelView:
    """`model` (as given: a PEFT or compiled wrapper, or the model itself), `base` (the transformers model
    inside it) and `spec` (its family's :class:`~hf_normalign.spec.ArchitectureSpec`)."""

    model: nn.Module
    base: nn.Module
    spec: ArchitectureSpec

    @classmethod
    def of(cls, model: nn.Module | ModelView) -> ModelView:
        """Resolve `model` (a view is returned as it is). Raises ValueError for a family with no spec."""
        if isinstance(model, ModelView):
            return model
        base = get_base_model(model)
        return cls(model, base, get_spec(base))

    @property
    def config(self):
        return self.base.config

    @property
    def model_type(self) -> str:
        return self.spec.model_type

    @functools.cached_property
    def layers(self) -> nn.ModuleList:
        """The LLM's decoder layers."""
        return self.spec.decoder_layers(self.base)

    @property
    def num_layers(self) -> int:
        """K, the number of decoder layers."""
        return len(self.layers)

    def resolve_layers(self, layers: Iterable[int] | None = None, *, include_embeddings: bool = False) -> list[int]:
        """Sorted, de-duplicated layer numbers in 0..K (default 1..K, plus 0 with ``include_embeddings``)."""
        k = self.num_layers
        chosen = list(range(1, k + 1)) if layers is None else [int(i) for i in layers]
        out = set()
        for i in chosen:
            j = i + k + 1 if i < 0 else i
            if not 0 <= j <= k:
                raise ValueError(
                    f"layer {i} is out of range: this model has layers 0 (embeddings) to {k}, or -1..-{k + 1}"
                )
            out.add(j)
        if include_embeddings:
            out.add(0)
        if not out:
            raise ValueError("no layers selected")
        return sorted(out)

    @property
    def vision_token_ids(self) -> list[int]:
        """Token ids marking vision positions (image and, where the family has one, video placeholders)."""
        return self.spec.vision_token_ids(self.base.config)

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size(self.base.config)

    @property
    def input_embeddings(self) -> nn.Module:
        return self.spec.input_embeddings(self.base)

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the device of the input embedding (the first device under a device map)."""
        weight = getattr(self.input_embeddings, "weight", None)
        return weight.device if weight is not None else next(self.base.parameters()).device

    @property
    def input_module(self) -> nn.Module:
        return self.spec.get(self.base, self.spec.input_module)

    @property
    def language_model(self) -> nn.Module:
        return self.spec.get(self.base, self.spec.language_model)

    @property
    def vision_tower(self) -> nn.Module:
        return self.spec.get(self.base, self.spec.vision_tower)

    @property
    def projector(self) -> nn.Module:
        return self.spec.get(self.base, self.spec.projector)

    @property
    def extra_projectors(self) -> list[nn.Module]:
        """Further projectors whose outputs reach the vision positions (Qwen3-VL's deepstack mergers)."""
        return [module for path in self.spec.extra_projectors for module in self.spec.get(self.base, path)]

    def embedding_scale(self) -> float:
        """The mean L2 norm of the text-embedding rows (projector LayerNorm's gain)."""
        return embedding_scale(self.base, self.spec)

    @staticmethod
    def device_of(module: nn.Module) -> torch.device:
        """Where `module`'s weights are, for the plugin modules that act on its output."""
        for tensor in module.parameters():
            if tensor.device.type == "meta":
                raise ValueError(
                    f"{type(module).__name__} has its weights on the meta device (disk offload or an unloaded "
                    "model); plugin modules cannot be placed there. Load the model with a device_map that keeps "
                    "the projector and decoder layers on CPU/GPU."
                )
            return tensor.device
        return torch.device("cpu")
