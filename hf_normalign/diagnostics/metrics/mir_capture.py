"""The capture side of MIR (:mod:`.mir`): the accumulators the probe runner feeds, streaming moments
(:class:`MIRAccumulator`) or every feature row (:class:`FeatureAccumulator`), and the per-layer feature store that
captures one group of layers at a time under a host-memory budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..engine import CaptureBatch
from ..maths.mir import StreamingMIRStats
from ..runner import Accumulator, CaptureRequest

__all__ = ["FeatureAccumulator", "LayerStore", "LayerView", "MIRAccumulator"]


class MIRAccumulator(Accumulator):
    """The streaming MIR statistics (a :class:`~.mir.StreamingMIR`) fed by the probe runner; ``result()`` is
    theirs (a :class:`~.mir.MIRResult`).

    Example:
        >>> from hf_normalign.diagnostics.metrics.mir import StreamingMIR
        >>> MIRAccumulator(StreamingMIR(outliers="drop", layer_indices=[1, 2]), [1, 2]).passes
        2
    """

    def __init__(self, stats: StreamingMIRStats, layers: Sequence[int], final_norm: bool = True) -> None:
        self.stats = stats
        self.request = CaptureRequest(tuple(layers), final_norm=final_norm, dtype=None)
        self.passes = stats.passes_required

    def update(self, batch: CaptureBatch) -> None:
        layers = self.request.layers
        self.stats.update(
            [batch.vision[k] for k in layers], [batch.text[k] for k in layers], num_samples=len(batch.sample_indices)
        )

    def merge(self, other: MIRAccumulator) -> None:
        self.stats.merge(other.stats)

    def end_pass(self) -> None:
        self.stats.end_pass()

    def result(self) -> Any:
        return self.stats.result()


class FeatureAccumulator(Accumulator):
    """Every vision and text row of the selected layers, kept on the host in the model's dtype; ``result()``
    gives layer -> (vision, text) with the rows in probe order (sample, then position), whatever the batches."""

    def __init__(self, layers: Sequence[int], final_norm: bool = True) -> None:
        self.request = CaptureRequest(tuple(layers), final_norm=final_norm, dtype=None, output_device="cpu")
        self.samples: dict[str, list[torch.Tensor]] = {"vision": [], "text": []}
        self.rows: dict[str, dict[int, list[torch.Tensor]]] = {"vision": {}, "text": {}}

    def update(self, batch: CaptureBatch) -> None:
        for kind, sample, feats in (
            ("vision", batch.vision_sample, batch.vision),
            ("text", batch.text_sample, batch.text),
        ):
            self.samples[kind].append(sample)
            for k in self.request.layers:
                self.rows[kind].setdefault(k, []).append(feats[k])

    def merge(self, other: FeatureAccumulator) -> None:
        for kind in ("vision", "text"):
            self.samples[kind] += other.samples[kind]
            for k, rows in other.rows[kind].items():
                self.rows[kind].setdefault(k, []).extend(rows)

    def result(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        order = {kind: torch.cat(self.samples[kind]).argsort(stable=True) for kind in ("vision", "text")}
        return {
            k: tuple(torch.cat(self.rows[kind][k])[order[kind]] for kind in ("vision", "text"))  # type: ignore[misc]
            for k in self.request.layers
        }


class LayerStore:
    """Per-layer (vision, text) features, captured one group of layers at a time on first access.

    ``mir_from_features`` walks the layers in order, so each group is captured once and the previous
    group is released before the next capture: host memory holds one group, the stats device one layer.
    """

    def __init__(
        self,
        run: Callable[[list[int]], dict[int, tuple[torch.Tensor, torch.Tensor]] | None],
        groups: list[list[int]],
        device: torch.device,
    ) -> None:
        self._run, self._groups, self._device = run, groups, device
        self._group_of = {k: i for i, g in enumerate(groups) for k in g}
        self._loaded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, layer: int, modality: int) -> torch.Tensor:
        if layer not in self._loaded:
            self._loaded = {}  # release the previous group before capturing the next
            self._loaded = self._run(self._groups[self._group_of[layer]]) or {}
        return self._loaded[layer][modality].to(self._device)


class LayerView(Sequence[torch.Tensor]):
    """One modality of a :class:`LayerStore` as the list of per-layer features mir_from_features takes."""

    def __init__(self, store: LayerStore, layers: list[int], modality: int) -> None:
        self._store, self._layers, self._modality = store, layers, modality

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self._store.get(self._layers[i], self._modality)
