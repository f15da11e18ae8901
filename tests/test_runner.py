"""The one protocol of the diagnostics: the probe runner and its accumulators, the batch plan, the result base
class, typed options and the spec's vision grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hf_normalign.diagnostics import (
    Accumulator,
    DegradationResult,
    KeySpaceResult,
    MIRResult,
    ModalityProfile,
    RunOptions,
    run_probe,
)
from hf_normalign.diagnostics.engine import batch_plan, capture
from hf_normalign.diagnostics.maths.keyspace import KeySpaceOptions
from hf_normalign.diagnostics.maths.reservoir import Reservoir
from hf_normalign.diagnostics.metrics.degradation import DegradationOptions
from hf_normalign.diagnostics.probes import prepare_probe
from hf_normalign.diagnostics.results import json_float
from hf_normalign.diagnostics.runner import CaptureRequest
from hf_normalign.model_view import ModelView
from hf_normalign.registry import ArchitectureSpec, get_spec
from hf_normalign.testing import tiny_model, tiny_processor


class _Counter(Accumulator):
    """A user-written metric: vision tokens per sample and the sum of layer-1 text features."""

    def __init__(self) -> None:
        self.request = CaptureRequest((1,))
        self.per_sample: dict[int, int] = {}
        self.text_sum = torch.zeros(())
        self.batches = 0

    def update(self, batch) -> None:
        self.batches += 1
        for s in batch.vision_sample.tolist():
            self.per_sample[s] = self.per_sample.get(s, 0) + 1
        self.text_sum = self.text_sum + batch.text[1].double().sum()

    def merge(self, other) -> None:
        self.per_sample.update(other.per_sample)
        self.text_sum = self.text_sum + other.text_sum

    def result(self) -> dict[int, int]:
        return self.per_sample


def test_runner_drives_any_accumulator_over_the_whole_probe():
    model, processor = tiny_model("llava"), tiny_processor("llava")
    samples = prepare_probe(processor, None, num_samples=5)
    acc = run_probe(model, processor, samples, _Counter(), RunOptions(batch_size=2, progress=False))
    ids = torch.tensor(ModelView.of(model).vision_token_ids)
    by_hand = {i: int(torch.isin(s.input_ids, ids).sum()) for i, s in enumerate(samples)}
    assert acc.result() == by_hand and acc.batches == 3
    # The text rows of layer 1 are those of a plain forward of each sample on its own.
    expected = 0.0
    for s in samples:
        with torch.no_grad():
            hidden = model(**s.inputs, output_hidden_states=True).hidden_states[1][0]
        expected += float(hidden[s.text_mask].double().sum())
    assert float(acc.text_sum) == pytest.approx(expected, rel=1e-5)


def test_batch_plan_buckets_by_length_and_cuts_padding():
    lengths = [30, 10, 31, 11, 29, 12]
    plain, bucketed = batch_plan(lengths, 2), batch_plan(lengths, 2, bucket_by_length=True)
    assert plain == [[0, 1], [2, 3], [4, 5]]
    assert bucketed == [[1, 3], [4, 5], [0, 2]]  # by length: 10, 11 | 12, 29 | 30, 31

    def padding(plan):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in plan)

    assert padding(plain) == 20 + 20 + 17 and padding(bucketed) == 1 + 17 + 1
    assert sorted(i for b in bucketed for i in b) == list(range(6))
    with pytest.raises(ValueError, match="batch_size"):
        batch_plan(lengths, 0)


def test_bucketed_capture_gives_each_sample_its_own_rows():
    model, processor = tiny_model("llava"), tiny_processor("llava")
    samples = prepare_probe(processor, None, num_samples=6)
    assert len({s.input_ids.shape[0] for s in samples}) > 1  # lengths differ: bucketing reorders

    def by_sample(**kwargs):
        out = {}
        for batch in capture(model, processor, samples, layers=[2], batch_size=3, progress=False, **kwargs):
            for s in batch.sample_indices:
                out[s] = batch.text[2][batch.text_sample == s]
        return out

    plain, bucketed = by_sample(), by_sample(bucket_by_length=True)
    assert plain.keys() == bucketed.keys() == set(range(6))
    for s in plain:
        torch.testing.assert_close(bucketed[s], plain[s], rtol=1e-4, atol=1e-5)


def test_reservoir_merge_equals_one_reservoir_and_keeps_the_smallest_priorities():
    g = torch.Generator().manual_seed(0)
    rows, priority = torch.randn(50, 3, generator=g), torch.rand(50, generator=g)
    ids = torch.arange(50)
    whole = Reservoir(7, seed=0)
    whole.update({1: rows}, ids=ids, priority=priority)
    parts = [Reservoir(7, seed=0), Reservoir(7, seed=0)]
    for part, chunk in zip(parts, (torch.arange(0, 50, 2), torch.arange(1, 50, 2)), strict=True):  # interleaved
        for piece in chunk.split(6):
            part.update({1: rows[piece]}, ids=ids[piece], priority=priority[piece])
    parts[0].merge(parts[1])
    kept = np.sort(np.argsort(priority.numpy())[:7])  # by hand: the 7 smallest priorities, in id order
    assert parts[0].seen == whole.seen == 50
    assert torch.equal(parts[0].rows[1], rows[kept]) and torch.equal(whole.rows[1], rows[kept])
    with pytest.raises(ValueError, match="together"):
        whole.update({1: rows[:2]}, ids=ids[:2])


def _results():
    nan, inf = math.nan, math.inf
    return [
        MIRResult(mir=-inf, per_layer=[0.0, 2.0], layers=[1, 2], num_samples=3, settings={"x": nan}),
        ModalityProfile(
            layers=[0],
            vision_norm_mean=[2.0],
            vision_norm_std=[nan],
            vision_norm_median=[2.0],
            text_norm_mean=[0.0],
            text_norm_std=[nan],
            text_norm_median=[0.0],
            norm_ratio=[inf],
            update_layers=[],
            vision_update_cos=[],
            text_update_cos=[],
            num_samples=1,
            num_vision_tokens=1,
            num_text_tokens=1,
            vision_path_norms={"projector_output": {"mean": 1.0, "std": nan, "count": 1}},
        ),
        KeySpaceResult(
            layers=[1],
            mmd2=[nan],
            mmd2_vision_halves=[0.1],
            mmd2_text_halves=[-inf],
            jsd=[0.2],
            jsd_vision_halves=[0.0],
            jsd_text_halves=[0.0],
            bandwidth=[1.5],
            jsd_bins=[4],
            num_vision_keys=[9],
            num_text_keys=[8],
            num_vision_used=[9],
            num_text_used=[8],
        ),
        DegradationResult(
            layers=[0, 1],
            effective_dim=[2.0, 1.0],
            offdiag_corr=[0.5, 0.6],
            cohesion=[0.5, 0.5],
            coupling=[0.0, 0.1],
            contrast_ratio=[inf, 5.0],
            probe_accuracy=None,
            probe_chance=None,
            num_images=4,
            num_classes=None,
            class_names=None,
            num_labelled_tokens=8,
        ),
    ]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("result", _results(), ids=lambda r: type(r).__name__)
def test_every_result_round_trips_strict_json_with_one_encoding(result):
    text = json.dumps(result.to_dict(), allow_nan=False)  # strict JSON: no NaN / Infinity tokens
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    back = type(result).from_dict(data)
    assert all(_same(getattr(back, k), getattr(result, k)) for k in data)
    printed = str(result)
    assert "inf" in printed or "nan" in printed  # non-finite values printed, not hidden
    assert [json_float(v) for v in (math.nan, math.inf, -math.inf)] == ["nan", "inf", "-inf"]


def test_format_table_lists_every_layer_with_its_values():
    r = _results()[3]
    lines = r.format_table().splitlines()
    assert lines[0].split()[:3] == ["layer", "effective", "dim"]
    assert [line.split()[0] for line in lines[2:]] == ["0", "1"]
    assert lines[2].split()[1:3] == ["2.000", "0.5000"] and "probe accuracy" not in lines[0]  # None: left out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RunOptions(padding_side="middle"), "padding_side"),
        (lambda: KeySpaceOptions(max_samples=2), "max_samples"),
        (lambda: KeySpaceOptions(clip_quantile=0.5), "clip_quantile"),
        (lambda: DegradationOptions(corr_axis="rows"), "corr_axis"),
        (lambda: DegradationOptions(min_coverage=0.0), "min_coverage"),
        (lambda: ArchitectureSpec("x", "p", "l", "v", vision_grid="hexagonal"), "vision_grid"),
    ],
)
def test_options_are_validated_on_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_vision_grid_lives_on_the_spec():
    assert get_spec(tiny_model("llava_next")).vision_grid == "overview_tile"
    assert get_spec(tiny_model("llava")).vision_grid == "square"
