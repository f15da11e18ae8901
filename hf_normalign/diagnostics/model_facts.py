"""What the diagnostics read off a model through its :class:`~hf_normalign.registry.ArchitectureSpec`: the
decoder depth, the layer numbering, the vision placeholder ids, the input device.

Layer numbering (the index into ``outputs.hidden_states`` of transformers)::

    layer 0          the LLM input: token embeddings with the projected vision features in place
    layer k, 1..K    the output of decoder layer k (1-based; module ``layers[k - 1]``)

Negative numbers count from the end (-1 is K).

Example:
    >>> from hf_normalign.testing import tiny_model
    >>> model = tiny_model("llava")
    >>> num_layers(model), resolve_layers(model, [-1])
    (2, [2])
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..modeling import get_base_model
from ..registry import get_spec

__all__ = ["model_input_device", "num_layers", "resolve_layers", "vision_token_ids"]


def num_layers(model: nn.Module) -> int:
    """K, the number of decoder layers of the LLM."""
    model = get_base_model(model)
    return len(get_spec(model).decoder_layers(model))


def resolve_layers(
    model: nn.Module, layers: Iterable[int] | None = None, *, include_embeddings: bool = False
) -> list[int]:
    """Sorted, de-duplicated layer numbers in 0..K (default 1..K, plus 0 with ``include_embeddings``).

    Example:
        >>> from hf_normalign.testing import tiny_model
        >>> resolve_layers(tiny_model("llava"), [-1, 1], include_embeddings=True)
        [0, 1, 2]
    """
    k = num_layers(model)
    chosen = list(range(1, k + 1)) if layers is None else [int(i) for i in layers]
    out = set()
    for i in chosen:
        j = i + k + 1 if i < 0 else i
        if not 0 <= j <= k:
            raise ValueError(f"layer {i} is out of range: this model has layers 0 (embeddings) to {k}, or -1..-{k + 1}")
        out.add(j)
    if include_embeddings:
        out.add(0)
    if not out:
        raise ValueError("no layers selected")
    return sorted(out)


def vision_token_ids(model: nn.Module) -> list[int]:
    """Token ids marking vision positions (image and, where the family has one, video placeholders)."""
    model = get_base_model(model)
    return get_spec(model).vision_token_ids(model.config)


def model_input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the device of the input embedding (the first device under a device map)."""
    model = get_base_model(model)
    weight = getattr(get_spec(model).input_embeddings(model), "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device
