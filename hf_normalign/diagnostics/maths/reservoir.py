"""A seeded uniform sample of at most k rows from a stream of batches, mergeable across processes."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["Reservoir"]


class Reservoir:
    """Bottom-k sampling: every row gets a uniform random priority and the ``k`` smallest are kept (all rows
    with ``k=None``). The same priorities serve every layer, so the same tokens are kept at every layer.

    Priorities come from a generator seeded with ``seed`` in arrival order, or from the caller
    (``priority``, with row ``ids``): a priority fixed per row makes the sample independent of the order
    and grouping of the batches, so :meth:`merge` of reservoirs fed disjoint parts of a stream equals one
    reservoir fed all of it. Kept rows are ordered by id (default ids: arrival order).

    Example:
        >>> import torch
        >>> r = Reservoir(3, seed=0)
        >>> for start in range(0, 10, 5):
        ...     r.update({1: torch.arange(start, start + 5.0)[:, None]})
        >>> r.seen, tuple(r.rows[1].shape)
        (10, (3, 1))
    """

    def __init__(self, k: int | None, seed: int) -> None:
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1 or None, got {k}")
        self.k, self.gen = k, torch.Generator().manual_seed(seed)
        self.priority = torch.empty(0)
        self.ids = torch.empty(0, dtype=torch.long)
        self.rows: dict[int, torch.Tensor] = {}
        self.seen = 0

    def update(
        self,
        feats: Mapping[int, torch.Tensor],
        *,
        ids: torch.Tensor | None = None,
        priority: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: layer -> [n, d] rows (the same n tokens at every layer)."""
        n = next(iter(feats.values())).shape[0]
        if (ids is None) != (priority is None):
            raise ValueError("pass ids and priority together (or neither)")
        ids = torch.arange(self.seen, self.seen + n) if ids is None else ids.reshape(-1).long().cpu()
        priority = torch.rand(n, generator=self.gen) if priority is None else priority.reshape(-1).cpu()
        self.seen += n
        self._add({k: x.detach() for k, x in feats.items()}, ids, priority)

    def merge(self, other: Reservoir) -> None:
        """Add the rows ``other`` kept (it must have seen other rows than this one)."""
        self.seen += other.seen
        if other.rows:
            self._add(other.rows, other.ids, other.priority)

    def _add(self, feats: Mapping[int, torch.Tensor], ids: torch.Tensor, priority: torch.Tensor) -> None:
        ids, priority = torch.cat([self.ids, ids]), torch.cat([self.priority, priority])
        keep = torch.arange(ids.shape[0])
        if self.k is not None and keep.shape[0] > self.k:
            keep = priority.topk(self.k, largest=False).indices
        keep = keep[ids[keep].argsort(stable=True)]  # ordered by row id
        identity = keep.shape[0] == ids.shape[0] and bool((keep == torch.arange(ids.shape[0])).all())
        self.ids, self.priority = ids[keep], priority[keep]
        for layer, x in feats.items():
            joined = torch.cat([self.rows[layer], x.to(self.rows[layer].device)]) if layer in self.rows else x
            self.rows[layer] = joined if identity else joined[keep.to(joined.device)]
