"""The result of MIR: MIR, per-layer FIDs, token and outlier counts, text scales (:mod:`.mir` computes it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..results import Column, Result, Table

__all__ = ["MIRResult"]


@dataclass
class MIRResult(Result):
    """MIR and its per-layer parts.

    Attributes:
        mir: log_base of the sum of per-layer FIDs (-inf when the sum is 0, NaN when it is negative,
            which only ``sqrt="reference_fast"`` can produce).
        per_layer: FID of each layer, in the order of ``layers``.
        layers: layer indices (as given by the caller; 0..K-1 by default).
        num_samples: number of image-text samples behind the features, if known.
        settings: how it was computed (outliers, outlier_threshold, sqrt, log_base, streaming, plus
            whatever the caller added, e.g. final_norm).
        num_vision_tokens / num_text_tokens: tokens per layer that entered the FID (after dropping).
        num_vision_outliers / num_text_outliers: tokens per layer flagged as outliers.
        text_scale: alpha_k = 1 / mean text-token norm per layer.

    Example:
        >>> r = MIRResult(mir=1.0, per_layer=[4.0, 6.0], layers=[1, 2], num_samples=2, settings={})
        >>> MIRResult.from_dict(r.to_dict()) == r
        True
    """

    mir: float
    per_layer: list[float]
    layers: list[int]
    num_samples: int | None
    settings: dict[str, Any]
    num_vision_tokens: list[int] = field(default_factory=list)
    num_text_tokens: list[int] = field(default_factory=list)
    num_vision_outliers: list[int] = field(default_factory=list)
    num_text_outliers: list[int] = field(default_factory=list)
    text_scale: list[float] = field(default_factory=list)

    TABLES = (
        Table(
            "layers",
            "layer",
            (
                Column("per_layer", "FID", ".5g"),
                Column("share", "share", ".1%", report=False),
                Column("num_vision_tokens", "vision tok", "d", report=False),
                Column("num_vision_outliers", "vision outl.", "d", report=False),
                Column("num_text_tokens", "text tok", "d", report=False),
                Column("num_text_outliers", "text outl.", "d", report=False),
            ),
        ),
    )

    @property
    def share(self) -> list[float]:
        """Each layer's FID as a fraction of their sum (NaN when the sum is not positive)."""
        total = sum(self.per_layer)
        return [fid / total if total > 0 else math.nan for fid in self.per_layer]

    def __str__(self) -> str:
        base = self.settings.get("log_base", 10)
        samples = f"{self.num_samples} samples, " if self.num_samples is not None else ""
        how = ", ".join(f"{k}={self.settings[k]}" for k in ("outliers", "sqrt") if k in self.settings)
        summary = (
            f"MIR = {self.mir:.4f} (log{base:g} of the sum of {len(self.per_layer)} per-layer FIDs = "
            f"{sum(self.per_layer):.5g}; {samples}{how})"
        )
        return summary + "\n" + self.format_table()
