"""The probe runner: one way to run any measurement over a probe, on one process or several.

Every metric is an :class:`Accumulator`: it names what it needs captured (:class:`CaptureRequest`), takes the
captured batches one by one (:meth:`Accumulator.update`), merges exactly with the accumulator of another
process (:meth:`Accumulator.merge`) and turns into a result (``result()``). :func:`run_probe` drives the
capture engine (:func:`~.engine.capture`) for it:

1. the batch plan: batches of ``batch_size`` samples, by default bucketed by length (less padding);
2. with an ``accelerate.Accelerator`` of several processes, batch i goes to process i % num_processes;
   each process captures its batches into its own accumulator;
3. the accumulators are merged on the main process in process order (every process calls ``run_probe``
   with the same arguments); the others get None.

Accumulators keep their results independent of the batch plan (rows are put back in probe order where order
matters), so several processes give what one process gives to float64 round-off.

Example:
    >>> from hf_normalign.testing import tiny_model, tiny_processor
    >>> from hf_normalign.diagnostics.probes import prepare_probe
    >>> from hf_normalign.diagnostics.metrics.profile import ProfileAccumulator
    >>> model, processor = tiny_model("llava"), tiny_processor("llava")
    >>> samples = prepare_probe(processor, None, num_samples=4)
    >>> acc = run_probe(model, processor, samples, ProfileAccumulator([0, 1, 2]), RunOptions(progress=False))
    >>> acc.result().num_vision_tokens
    64
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .engine import CaptureBatch, batch_plan, capture
from .probes.encoding import EncodedSample

__all__ = ["Accumulator", "CaptureRequest", "ProcessGroup", "RunOptions", "run_probe"]


@dataclass(frozen=True)
class CaptureRequest:
    """What an accumulator needs from each batch: layer numbers (:mod:`.model_facts`), layer K after the final
    norm or before it, ``k_proj`` outputs, the dtype and device of the captured rows."""

    layers: tuple[int, ...]
    final_norm: bool = True
    capture_keys: bool = False
    dtype: torch.dtype | None = torch.float32
    output_device: str | torch.device | None = None


@dataclass(frozen=True)
class RunOptions:
    """How the probe runs: samples per forward pass, the forward's device (default: the input embedding's),
    padding side, length bucketing, progress bars. Validated on construction.

    Example:
        >>> RunOptions(batch_size=0)
        Traceback (most recent call last):
        ...
        ValueError: batch_size must be >= 1, got 0
    """

    batch_size: int = 8
    device: str | torch.device | None = None
    padding_side: str = "right"
    bucket_by_length: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")


class Accumulator(ABC):
    """Streaming state of one metric. Subclasses set :attr:`request` and implement ``update`` / ``merge`` /
    ``result``; :meth:`attach` may install model hooks for the run (none by default).

    An accumulator crosses process boundaries (pickled by ``torch.distributed``), so it holds no model
    reference outside :meth:`attach`.
    """

    request: CaptureRequest
    passes: int = 1  # probe passes needed (a second pass may depend on the merged first)

    @abstractmethod
    def update(self, batch: CaptureBatch) -> None:
        """Add the rows of one captured batch."""

    @abstractmethod
    def merge(self, other: Any) -> None:
        """Add everything ``other`` (an accumulator of the same kind and options) has seen; exact."""

    @abstractmethod
    def result(self) -> Any:
        """The metric's result over everything added and merged."""

    def attach(self, model: nn.Module, samples: Sequence[EncodedSample]) -> contextlib.AbstractContextManager[None]:
        """Hooks the accumulator needs on ``model`` while a pass runs (removed on exit)."""
        return contextlib.nullcontext()

    def end_pass(self) -> None:  # noqa: B027 - optional: only multi-pass metrics override it
        """Called between passes on the accumulator merged over every process: start the next pass from it."""


class ProcessGroup:
    """The processes of an ``accelerate.Accelerator`` running one measurement together (one process: a no-op).

    Example:
        >>> group = ProcessGroup(None)
        >>> group.shard([[0, 1], [2, 3]]), group.is_main
        ([[0, 1], [2, 3]], True)
    """

    def __init__(self, accelerator: Any = None) -> None:
        self.rank = 0 if accelerator is None else int(accelerator.process_index)
        self.size = 1 if accelerator is None else int(accelerator.num_processes)
        self.is_main = self.rank == 0

    def shard(self, plan: Sequence[Sequence[int]]) -> list[Sequence[int]]:
        """This process's batches of the one-process plan: batch i goes to process i % size."""
        return list(plan[self.rank :: self.size])

    def merged(self, acc: Accumulator, *, everywhere: bool) -> Accumulator | None:
        """Every process's accumulator merged in process order: on all processes (``everywhere``) or on the main
        one only (the others get None)."""
        if self.size == 1:
            return acc
        parts: list[Any] = [None] * self.size
        if everywhere:
            torch.distributed.all_gather_object(parts, acc)
        else:
            torch.distributed.gather_object(acc, parts if self.is_main else None, dst=0)
            if not self.is_main:
                return None
        for part in parts[1:]:
            parts[0].merge(part)
        return parts[0]


def _batches(
    model: nn.Module, processor: Any, samples: list[EncodedSample], acc: Accumulator, run: RunOptions, mine: list
) -> Iterator[CaptureBatch]:
    if not mine:  # a process without a batch (more processes than batches) still takes part in the merge
        return iter(())
    req = acc.request
    return capture(
        model,
        processor,
        samples,
        layers=list(req.layers),
        final_norm=req.final_norm,
        capture_keys=req.capture_keys,
        dtype=req.dtype,
        output_device=req.output_device,
        batch_size=run.batch_size,
        device=run.device,
        padding_side=run.padding_side,
        progress=run.progress,
        batches=mine,
    )


def run_probe(
    model: nn.Module,
    processor: Any,
    samples: Sequence[EncodedSample],
    accumulator: Accumulator,
    run: RunOptions | None = None,
    *,
    accelerator: Any = None,
) -> Any:
    """Run ``model`` over the encoded ``samples`` into ``accumulator``; returns it merged over the processes of
    ``accelerator`` on the main process, None on the others (module docstring)."""
    run = run or RunOptions()
    samples = list(samples)
    group = ProcessGroup(accelerator)
    plan = batch_plan([s.input_ids.shape[0] for s in samples], run.batch_size, run.bucket_by_length)
    mine = group.shard(plan)
    acc: Accumulator | None = accumulator
    for index in range(accumulator.passes):
        with acc.attach(model, samples):
            for batch in _batches(model, processor, samples, acc, run, mine):
                acc.update(batch)
        if index < accumulator.passes - 1:
            acc = group.merged(acc, everywhere=True)
            acc.end_pass()
    return group.merged(acc, everywhere=False)
