"""The demo experiment: stage-1 alignment of six variants on the synthetic captioning task, measured.

Steps (all offline, CPU):

1. data: train and held-out scenes (:mod:`.data`), encoded with the real ``LlavaProcessor``;
2. base model: a LLaVA with a loud, frozen, random CLIP tower (:mod:`.models`), its LLM pre-trained on text;
3. stage-1 per variant, from the same base copy, same seed, same batches in the same order, same steps:
   vision tower and LLM frozen, projector + plugin modules trained with AdamW (lr 1e-3, 3% warmup, cosine,
   no weight decay, gradient clipping at 1.0; the LLaVA stage-1 recipe the papers use);
4. held-out evaluation: caption loss (mean token cross-entropy over the caption), teacher-forced token
   accuracy, the same accuracy on the content words only (colour, shape, position), and on held-out
   combinations only;
5. diagnostics with the library's own code (:func:`~hf_normalign.diagnostics.report.build_report`): norm and
   update-rate profiles and MIR, on a probe of held-out images paired with unrelated text passages;
6. steps 1-5 once per seed (``DemoConfig.seeds``: 3 in the full run, 1 with ``--quick``); the tables show
   mean ± std over seeds, the examples, curves and plots the first seed's;
7. the "all three" model (first seed) is saved with ``save_pretrained`` and reloaded with ``normalign.from_pretrained``;
   its held-out logits must be equal (``torch.equal``) to the in-memory model's.

Example:
    >>> result = run_demo(DemoConfig.quick(), "normalign-demo")  # doctest: +SKIP
    >>> print(result.table)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import hf_normalign as normalign

from ..config import NormAlignConfig, ProjectorNormConfig
from .data import (
    Split,
    build_tokenizer,
    make_splits,
    passages,
    pretraining_corpus,
)
from .models import ModelSizes, build_model, build_processor, pretrain_language_model, vision_feature_norm
from .training import EncodedSplit, batch_order, encode, evaluate, generate_captions, patched_copy, train_stage1

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

__all__ = ["VARIANTS", "DemoConfig", "DemoResult", "aggregate_seeds", "evaluate", "run_demo", "train_stage1"]

# Variant name -> the patch applied before stage-1 (None: the plain model).
VARIANTS: dict[str, NormAlignConfig | None] = {
    "baseline": None,
    "projector_norm": NormAlignConfig(projector_norm=ProjectorNormConfig(gwc=True)),
    "projector_norm (no GWC)": NormAlignConfig(projector_norm=ProjectorNormConfig(gwc=False)),
    "moca": NormAlignConfig(moca=True),
    "pre": NormAlignConfig(pre=True),
    "all three": NormAlignConfig(projector_norm=True, moca=True, pre=True),
}
SAVED_VARIANT = "all three"
NUM_EXAMPLES = 6  # held-out images shown in the report with every variant's greedy caption


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of one demo run. :meth:`quick` and :meth:`full` are the two presets of the CLI.

    Example:
        >>> DemoConfig.quick(steps=10).steps
        10
    """

    seed: int = 0
    train_images: int = 4000
    heldout_images: int = 512
    lm_lines: int = 6000
    lm_steps: int = 600
    steps: int = 1000  # stage-1 optimiser steps per variant
    batch_size: int = 32
    lr: float = 1e-3
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    probe_samples: int = 64  # held-out images (each with a text passage) for MIR and the profiles
    eval_batch_size: int = 64
    seeds: int = 3  # whole runs with seeds seed, seed + 1, ...: the tables show mean ± std over them
    sizes: ModelSizes = field(default_factory=ModelSizes)

    def __post_init__(self) -> None:
        for name in ("steps", "lm_steps", "batch_size", "lm_lines", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.train_images < self.batch_size:
            raise ValueError(f"train_images ({self.train_images}) must be at least batch_size ({self.batch_size})")
        if not 2 <= self.probe_samples <= self.heldout_images or self.heldout_images < NUM_EXAMPLES:
            raise ValueError(
                f"need 2 <= probe_samples <= heldout_images and heldout_images >= {NUM_EXAMPLES}; "
                f"got probe_samples={self.probe_samples}, heldout_images={self.heldout_images}"
            )

    @classmethod
    def full(cls, **overrides: Any) -> DemoConfig:
        """The full run: 3 seeds (about 7 minutes of CPU time per seed on 2 CPU cores)."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """``--quick`` (under 3 minutes on 2 CPU cores): fewer images and steps, same model, one seed."""
        return cls(**{"train_images": 2000, "heldout_images": 256, "lm_lines": 3000, "lm_steps": 300,
                      "steps": 200, "probe_samples": 32, "seeds": 1, **overrides})  # fmt: skip


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    Attributes:
        out_dir: output folder; ``report``, ``results_json``, ``checkpoint``: the files in it.
        results: the content of ``results.json`` (every number of the run).
        table: the terminal table (one row per variant).
        models: variant name -> trained model (eval mode); ``processor``: their processor.
        checkpoint_equal: whether the reloaded checkpoint gave exactly the saved model's logits.
    """

    out_dir: Path
    report: Path
    results_json: Path
    checkpoint: Path
    results: dict[str, Any]
    table: str
    models: dict[str, LlavaForConditionalGeneration]
    processor: LlavaProcessor
    checkpoint_equal: bool


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


@contextmanager
def _timed(times: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall time of the block to ``times[phase]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[phase] = times.get(phase, 0.0) + time.perf_counter() - start


def run_demo(
    config: DemoConfig | None = None,
    out_dir: str | Path = "normalign-demo",
    *,
    variants: Sequence[str] | None = None,
    num_threads: int | None = 1,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> DemoResult:
    """Run the whole demo and write ``report.html``, ``results.json``, ``diagnostics/`` and ``checkpoint/``
    (and ``diagnostics-seed<N>/`` for every seed after the first).

    Args:
        config: sizes and budgets (default :meth:`DemoConfig.full`).
        out_dir: output folder (created; existing files of a previous run are overwritten).
        variants: a subset of :data:`VARIANTS` (default all; must include ``"all three"``, the saved one).
        num_threads: torch intra-op threads during the run (restored after); the models are so small that
            one thread is fastest; ``None`` leaves the setting alone.
        progress: tqdm progress bars.
        log: where the phase messages and the final table go (``None``: silent).

    Example:
        >>> result = run_demo(DemoConfig.quick(), "/tmp/demo", progress=False)  # doctest: +SKIP
        >>> result.checkpoint_equal  # doctest: +SKIP
        True
    """
    from .report import format_table, write_report

    if importlib.util.find_spec("matplotlib") is None:  # fail now, not after minutes of training
        raise ImportError("the demo's report needs matplotlib: pip install 'hf-normalign[plots]'")
    config = config or DemoConfig.full()
    names = list(VARIANTS) if variants is None else list(variants)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or SAVED_VARIANT not in names:
        raise ValueError(f"variants must be among {list(VARIANTS)} and include {SAVED_VARIANT!r}; got {names}")
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    times: dict[str, float] = {}
    seeds = [config.seed + k for k in range(config.seeds)]
    try:
        runs = []
        for k, seed in enumerate(seeds):
            if len(seeds) > 1:
                say(f"--- seed {seed} ({k + 1}/{len(seeds)}) ---")
            runs.append(_run_seed(dataclasses.replace(config, seed=seed), names, out, times, k == 0, progress, say))
        first = runs[0]
        models, processor = first["models"], first["processor"]
        with _timed(times, "checkpoint"):
            checkpoint = out / "checkpoint"
            check = _checkpoint_roundtrip(models[SAVED_VARIANT], processor, first["heldout"], checkpoint)
        say(f"checkpoint: saved '{SAVED_VARIANT}' to {checkpoint}, reloaded with normalign.from_pretrained: "
            f"logits on {check['batch_size']} held-out samples {'EQUAL' if check['equal'] else 'DIFFERENT'} "
            f"(max |diff| {check['max_abs_diff']:.3g})")  # fmt: skip

        heldout, split = first["heldout"], first["split"]
        results = {
            "config": dataclasses.asdict(config),
            "seeds": seeds,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "variants": aggregate_seeds([run["variants"] for run in runs]),
            "base": first["base"],
            "data": {
                "train_images": first["train_images"],
                "heldout_images": len(heldout),
                "heldout_unseen_combination_images": int(heldout.unseen.sum()),
                "unseen_combinations": sorted(" ".join(c) for c in split.unseen_combinations),
                "probe_samples": config.probe_samples,
            },
            "checkpoint": {"variant": SAVED_VARIANT, "path": str(checkpoint), **check},
            "examples": [
                {"caption": s.caption, "unseen": s.combination in split.unseen_combinations} for s in first["examples"]
            ],
            "timing_seconds": times,
            "environment": _environment(),
        }
        table = format_table(results)
        report, results_json = write_report(results, out, first["example_images"])
        say(f"\n{table}\n\nreport: {report}\nresults: {results_json}")
        return DemoResult(out, report, results_json, checkpoint, results, table, models, processor, check["equal"])
    finally:
        torch.set_num_threads(threads)


def _run_seed(
    config: DemoConfig,
    names: Sequence[str],
    out: Path,
    times: dict[str, float],
    first: bool,
    progress: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """One whole run with ``config.seed``: data, base model, stage-1 of every variant, held-out metrics,
    diagnostics (to ``out/diagnostics``, or ``out/diagnostics-seed<N>`` after the first seed), and for the
    first seed the example captions. Phase times are added to ``times``."""
    with _timed(times, "data"):
        split = make_splits(config.seed, config.train_images, config.heldout_images)
        processor = build_processor(build_tokenizer())
        train = encode(processor, split.train)
        heldout = encode(processor, split.heldout, split.unseen_combinations)
    say(f"data: {len(train)} train / {len(heldout)} held-out images "
        f"({int(heldout.unseen.sum())} of unseen combinations)")  # fmt: skip

    with _timed(times, "text pre-training"):
        base = build_model(processor.tokenizer, seed=config.seed, sizes=config.sizes)
        lm_losses = pretrain_language_model(
            base,
            processor.tokenizer,
            pretraining_corpus(config.seed, config.lm_lines),
            steps=config.lm_steps,
            batch_size=config.batch_size,
            seed=config.seed,
            progress=progress,
        )
    scales = _scales(base, heldout)
    say(f"LLM pre-trained on text: loss {lm_losses[0]:.2f} -> {_tail_mean(lm_losses):.2f}; text embedding "
        f"norm {scales['text_embedding_norm']:.3f}, vision features {scales['vision_feature_norm']:.1f}, "
        f"projector output at init {scales['projector_output_norm']:.1f}")  # fmt: skip

    order = batch_order(len(train), config.batch_size, config.steps, config.seed)
    models: dict[str, Any] = {}
    variant_results: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        model = patched_copy(base, VARIANTS[name], config.seed)
        desc = f"stage-1 [{i + 1}/{len(names)}] {name}"
        own: dict[str, float] = {}  # this variant's seconds alone; `times` sums over seeds
        with _timed(own, "train"), _timed(times, f"stage-1 {name}"):
            history = train_stage1(model, train, order, config, desc=desc, progress=progress)
        with _timed(times, "evaluation"):
            metrics = evaluate(model, heldout, config.eval_batch_size)
        models[name] = model
        variant_results[name] = {
            "methods": VARIANTS[name].to_dict() if VARIANTS[name] is not None else None,
            **metrics,
            "train_seconds": own["train"],
            "train_loss_final": _tail_mean(history["loss"]),
            "history": history,
        }
        say(f"{desc}: held-out caption loss {metrics['caption_loss']:.3f}, content accuracy "
            f"{metrics['content_accuracy']:.3f} ({own['train']:.1f} s)")  # fmt: skip

    examples = split.heldout[:NUM_EXAMPLES]
    example_images = [s.image() for s in examples]
    if first:
        with _timed(times, "greedy captions"):
            for name, model in models.items():
                variant_results[name]["samples"] = generate_captions(model, processor, example_images)

    say(f"diagnostics: MIR and norm / update-rate profiles of {len(models)} variants on {config.probe_samples} "
        "held-out images with text passages")  # fmt: skip
    folder = out / ("diagnostics" if first else f"diagnostics-seed{config.seed}")
    with _timed(times, "diagnostics"):
        diagnostics = _diagnostics(models, processor, split, config, folder)
    for name, numbers in diagnostics.items():
        variant_results[name].update(numbers)
    return {
        "variants": variant_results,
        "models": models if first else {},
        "processor": processor,
        "heldout": heldout,
        "split": split,
        "train_images": len(train),
        "base": {"text_pretraining_loss": lm_losses, **scales},
        "examples": examples,
        "example_images": example_images,
    }


def aggregate_seeds(runs: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per variant: the first seed's row, its table numbers (:data:`.report.COLUMNS`) replaced by the mean
    over seeds, with ``per_seed`` (the values) and ``std`` (sample std, n - 1). One run: returned as is.

    Example:
        >>> rows = aggregate_seeds([{"b": {"mir": 1.0}}, {"b": {"mir": 2.0}}, {"b": {"mir": 3.0}}])
        >>> rows["b"]["mir"], rows["b"]["std"]["mir"], rows["b"]["per_seed"]["mir"]
        (2.0, 1.0, [1.0, 2.0, 3.0])
    """
    from .report import COLUMNS

    if len(runs) == 1:
        return runs[0]
    out = {}
    for name, row in runs[0].items():
        row = {**row, "per_seed": {}, "std": {}}
        for key in COLUMNS:
            values = [run[name].get(key, run[name].get("summary", {}).get(key)) for run in runs]
            if any(v is None for v in values):
                continue
            mean = sum(values) / len(values)
            row[key] = mean
            row["per_seed"][key] = values
            row["std"][key] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        out[name] = row
    return out


def _tail_mean(values: Sequence[float], fraction: float = 0.05) -> float:
    """Mean of the last ``fraction`` of a loss curve (at least one value)."""
    tail = values[-max(1, int(len(values) * fraction)) :]
    return sum(tail) / len(tail)


def _scales(model: LlavaForConditionalGeneration, heldout: EncodedSplit) -> dict[str, float]:
    """Text embedding norm (the projector LayerNorm's target) and the vision norms, before stage-1."""
    from ..registry import embedding_scale, get_spec

    vision, projected = vision_feature_norm(model, heldout.inputs["pixel_values"][:64])
    return {
        "text_embedding_norm": embedding_scale(model, get_spec(model)),
        "vision_feature_norm": vision,
        "projector_output_norm": projected,
    }


def _probe(split: Split, num: int, seed: int):
    """Held-out images, each paired with an unrelated text passage (as the MIR paper's probe)."""
    from ..diagnostics.probes import Probe

    scenes = split.heldout[:num]
    texts = passages(seed + 1, len(scenes))
    return Probe.from_pairs([(s.image(), t) for s, t in zip(scenes, texts, strict=True)], name="demo held-out")


def _diagnostics(
    models: dict[str, Any], processor: Any, split: Split, config: DemoConfig, out: Path
) -> dict[str, dict[str, Any]]:
    """Norm / update-rate profiles and MIR of every variant, through the library's report builder."""
    from ..diagnostics.report import build_report

    report = build_report(
        {name: (model, processor) for name, model in models.items()},
        out,
        _probe(split, config.probe_samples, config.seed),
        metrics=("profile", "mir"),
        num_samples=None,
        batch_size=16,
        seed=config.seed,
        title=f"hf-normalign demo: diagnostics per variant (seed {config.seed})",
        links={"demo report": "../report.html"},
        progress=False,  # seconds only; its nested bars would interleave with the demo's log
    )
    return {
        name: {
            "mir": res["mir"].mir,
            "mir_per_layer": res["mir"].to_dict(),
            "profile": res["profile"].to_dict(),
            "summary": report.summary[name],
        }
        for name, res in report.results.items()
    }


def _checkpoint_roundtrip(
    model: LlavaForConditionalGeneration, processor: Any, heldout: EncodedSplit, path: Path
) -> dict[str, Any]:
    """Save with ``save_pretrained``, reload with ``normalign.from_pretrained``, compare held-out logits."""
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # transformers' per-file bars would clutter the demo's output
    try:
        model.save_pretrained(path)
        processor.save_pretrained(path)  # so the checkpoint runs on its own (`normalign mir`, `normalign report`)
        reloaded = normalign.from_pretrained(path).eval()
    finally:
        if bars:
            logging.enable_progress_bar()
    batch = heldout.batch(slice(0, 16))
    batch.pop("labels")
    with torch.no_grad():
        expected, got = model(**batch).logits, reloaded(**batch).logits
    return {
        "equal": bool(torch.equal(expected, got)),
        "max_abs_diff": float((expected - got).abs().max()),
        "batch_size": int(batch["input_ids"].shape[0]),
        "methods": normalign.get_config(reloaded).methods,
    }


def _environment() -> dict[str, Any]:
    import os
    import platform

    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_normalign": normalign.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
    }
