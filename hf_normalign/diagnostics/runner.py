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

The model is resolved once (:class:`~hf_normalign.model_view.ModelView`) and the view goes to the engine and to
every accumulator's :meth:`Accumulator.attach`. Several metrics over the same encoded probe run in one pass with
:class:`CombinedAccumulator`: the forward captures the union of what they ask for, and each gets the batch it
would have got alone (its layers, layer K before or after the final norm, its dtype and device), so each result
equals the metric's own run exactly.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model_view import ModelView
from .engine import CaptureBatch, batch_plan, capture
from .probes.encoding import EncodedSample

__all__ = [
    "Accumulator",
    "CaptureRequest",
    "CombinedAccumulator",
    "MetricRun",
    "ProcessGroup",
    "RunOptions",
    "run_metrics",
    "run_probe",
]


@dataclass(frozen=True)
class CaptureRequest:
    """What an accumulator needs from each batch: layer numbers (:class:`~hf_normalign.model_view.ModelView`),
    layer K after the final norm or before it (``"both"``: both, :mod:`.engine`), ``k_proj`` outputs, the dtype and
    device of the captured rows."""

    layers: tuple[int, ...]
    final_norm: bool | str = True
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

    def attach(self, view: ModelView, samples: Sequence[EncodedSample]) -> contextlib.AbstractContextManager[None]:
        """Hooks the accumulator needs on the model of ``view`` while a pass runs (removed on exit)."""
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


class CombinedAccumulator(Accumulator):
    """Several accumulators fed by one pass over the same probe (name -> accumulator).

    The request is the union of theirs: every layer any of them wants, ``k_proj`` outputs if one wants them,
    layer K both before and after the final norm when they disagree, rows in the model's dtype where they
    device. Each part then gets the :class:`~.engine.CaptureBatch` it would have been given alone: its
    layers, its version of layer K, its dtype and device (the same ``.to`` the engine applies), so its result
    is what it gives in a pass of its own. Multi-pass parts (MIR with ``outliers="drop"``) take the later
    passes alone; the forward still captures the union.

    Example:
        >>> from hf_normalign.diagnostics.metrics.profile import ProfileAccumulator
        >>> both = CombinedAccumulator({"a": ProfileAccumulator([0, 1]), "b": ProfileAccumulator([1, 2])})
        >>> both.request.layers
        (0, 1, 2)
    """

    def __init__(self, parts: Mapping[str, Accumulator]) -> None:
        if not parts:
            raise ValueError("CombinedAccumulator needs at least one accumulator")
        self.parts = dict(parts)
        reqs = [acc.request for acc in self.parts.values()]
        layers = sorted({k for r in reqs for k in r.layers})
        norms = {r.final_norm for r in reqs if max(r.layers) == layers[-1]}  # only the deepest layer can be K
        dtypes = {r.dtype for r in reqs}
        devices = {r.output_device for r in reqs}
        self.request = CaptureRequest(
            tuple(layers),
            final_norm="both" if len(norms) > 1 or "both" in norms else norms.pop(),
            capture_keys=any(r.capture_keys for r in reqs),
            dtype=dtypes.pop() if len(dtypes) == 1 else None,
            output_device=devices.pop() if len(devices) == 1 else None,
        )
        self.passes = max(acc.passes for acc in self.parts.values())
        self.current_pass = 0

    def _active(self) -> dict[str, Accumulator]:
        return {name: acc for name, acc in self.parts.items() if self.current_pass < acc.passes}

    @contextlib.contextmanager
    def attach(self, view: ModelView, samples: Sequence[EncodedSample]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for acc in self._active().values():
                stack.enter_context(acc.attach(view, samples))
            yield

    def _view(self, batch: CaptureBatch, req: CaptureRequest) -> CaptureBatch:
        """``batch`` as a run of ``req`` alone would have captured it."""

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=req.output_device or t.device, dtype=req.dtype or t.dtype)

        vision = {k: batch.vision[k] for k in req.layers}
        text = {k: batch.text[k] for k in req.layers}
        if req.final_norm is True and batch.vision_normed is not None and req.layers[-1] == self.request.layers[-1]:
            vision[req.layers[-1]], text[req.layers[-1]] = batch.vision_normed, batch.text_normed
        keys = [k for k in req.layers if k > 0] if req.capture_keys else []
        return CaptureBatch(
            layers=list(req.layers),
            vision={k: rows(v) for k, v in vision.items()},
            text={k: rows(t) for k, t in text.items()},
            vision_sample=batch.vision_sample,
            vision_patch=batch.vision_patch,
            text_sample=batch.text_sample,
            text_token=batch.text_token,
            sample_indices=batch.sample_indices,
            vision_keys={k: rows(batch.vision_keys[k]) for k in keys},
            text_keys={k: rows(batch.text_keys[k]) for k in keys},
        )

    def update(self, batch: CaptureBatch) -> None:
        for acc in self._active().values():
            acc.update(self._view(batch, acc.request))

    def merge(self, other: CombinedAccumulator) -> None:
        for name, acc in self.parts.items():
            acc.merge(other.parts[name])

    def end_pass(self) -> None:
        for acc in self._active().values():
            if self.current_pass < acc.passes - 1:
                acc.end_pass()
        self.current_pass += 1

    def result(self) -> dict[str, Accumulator]:
        """The parts, merged: each turns into its metric's result as it would alone."""
        return self.parts


def _batches(
    view: ModelView, processor: Any, samples: list[EncodedSample], acc: Accumulator, run: RunOptions, mine: list
) -> Iterator[CaptureBatch]:
    if not mine:  # a process without a batch (more processes than batches) still takes part in the merge
        return iter(())
    req = acc.request
    return capture(
        view,
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
    model: nn.Module | ModelView,
    processor: Any,
    samples: Sequence[EncodedSample],
    accumulator: Accumulator,
    run: RunOptions | None = None,
    *,
    accelerator: Any = None,
) -> Any:
    """Run ``model`` (or its :class:`~hf_normalign.model_view.ModelView`) over the encoded ``samples`` into
    ``accumulator``; returns it merged over the processes of ``accelerator`` on the main process, None on the
    others (module docstring)."""
    view = ModelView.of(model)
    run = run or RunOptions()
    samples = list(samples)
    group = ProcessGroup(accelerator)
    plan = batch_plan([s.input_ids.shape[0] for s in samples], run.batch_size, run.bucket_by_length)
    mine = group.shard(plan)
    acc: Accumulator | None = accumulator
    for index in range(accumulator.passes):
        with acc.attach(view, samples):
            for batch in _batches(view, processor, samples, acc, run, mine):
                acc.update(batch)
        if index < accumulator.passes - 1:
            acc = group.merged(acc, everywhere=True)
            acc.end_pass()
    return group.merged(acc, everywhere=False)


class MetricRun(ABC):
    """One metric prepared for one model and probe (the contract every metric keeps): its ``name``, the encoded
    ``samples`` it runs over, a fresh :meth:`accumulator`, and :meth:`finish`, the result from the accumulator
    merged over the probe. :meth:`run` runs it alone; :func:`run_metrics` runs several, sharing probe passes.
    ``shareable=False`` marks a run that needs passes of its own (MIR's layer groups under a memory budget)."""

    name: str
    samples: list[EncodedSample]
    shareable: bool = True

    @abstractmethod
    def accumulator(self) -> Accumulator:
        """A fresh accumulator of this metric."""

    @abstractmethod
    def finish(self, merged: Any) -> Any:
        """The metric's result from its accumulator merged over every process."""

    def run(self, model: nn.Module | ModelView, processor: Any, run: RunOptions, accelerator: Any = None) -> Any:
        """The metric in passes of its own (what its public function does); None off the main process."""
        merged = run_probe(model, processor, self.samples, self.accumulator(), run, accelerator=accelerator)
        return None if merged is None else self.finish(merged)


def _same_samples(a: Sequence[EncodedSample], b: Sequence[EncodedSample]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def run_metrics(
    model: nn.Module | ModelView,
    processor: Any,
    metrics: Sequence[MetricRun],
    run: RunOptions | None = None,
    *,
    accelerator: Any = None,
) -> dict[str, Any]:
    """Run prepared metrics with as few probe passes as possible: shareable metrics over the same encoded samples
    (the same objects) run in one pass (:class:`CombinedAccumulator`); each result equals the metric's own run.
    Returns name -> result (None on the processes other than the main one).

    Example:
        >>> from hf_normalign.testing import tiny_model, tiny_processor
        >>> from hf_normalign.diagnostics import MIROptions, RunOptions, mir_run, profile_run
        >>> from hf_normalign.diagnostics.probes import prepare_probe
        >>> model, processor = tiny_model("llava"), tiny_processor("llava")
        >>> samples = prepare_probe(processor, None, num_samples=4)
        >>> prepared = [profile_run(model, processor, samples=samples), mir_run(model, processor, samples=samples)]
        >>> out = run_metrics(model, processor, prepared, RunOptions(progress=False))  # one pass: the probe is shared
        >>> sorted(out), out["mir"].layers
        (['mir', 'profile'], [1, 2])
    """
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise ValueError(f"run_metrics needs one prepared run per metric name, got {names}")
    view = ModelView.of(model)
    run = run or RunOptions()
    groups: list[list[MetricRun]] = []
    for metric in metrics:
        home = next(
            (g for g in groups if metric.shareable and g[0].shareable and _same_samples(g[0].samples, metric.samples)),
            None,
        )
        if home is None:
            groups.append([metric])
        else:
            home.append(metric)
    results: dict[str, Any] = {}
    for group in groups:
        if len(group) == 1:
            results[group[0].name] = group[0].run(view, processor, run, accelerator)
            continue
        combined = CombinedAccumulator({m.name: m.accumulator() for m in group})
        merged = run_probe(view, processor, group[0].samples, combined, run, accelerator=accelerator)
        for m in group:
            results[m.name] = None if merged is None else m.finish(merged.parts[m.name])
    return {m.name: results[m.name] for m in metrics}
