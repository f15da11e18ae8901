"""One pass, one contract: the report runs profile + MIR + key-space in one probe pass (forwards counted with a hook
on the model) and its results equal the separate per-metric calls; the options dataclasses equal the keywords."""

from __future__ import annotations

import math

import pytest
import torch

from hf_normalign.diagnostics import (
    DegradationOptions,
    KeySpaceOptions,
    MIROptions,
    ProfileOptions,
    RunOptions,
    build_report,
    key_space_gap,
    key_space_run,
    mir,
    mir_run,
    modality_profile,
    profile_run,
    run_metrics,
    visual_degradation,
)
from hf_normalign.diagnostics.probes import prepare_probe
from hf_normalign.diagnostics.runner import CombinedAccumulator
from hf_normalign.testing import tiny_model, tiny_processor

N, BATCH, DEG = 6, 3, 12  # probe pairs, samples per forward, degradation pairs


class Forwards:
    """Counts the model's top-level forward calls (one per batch of a probe pass)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.count = model, 0

    def __enter__(self) -> Forwards:
        self.handle = self.model.register_forward_pre_hook(self._hit)
        return self

    def _hit(self, *args) -> None:
        self.count += 1

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llava"), tiny_processor("llava")


def _separate(model, processor):
    """What the report called before it shared a pass: one public call per metric."""
    common = {"batch_size": BATCH, "seed": 0, "progress": False}
    return {
        "profile": modality_profile(model, processor, num_samples=N, **common),
        "mir": mir(model, processor, num_samples=N, **common),
        "key_space": key_space_gap(model, processor, num_samples=N, max_samples=200, tsne=False, **common),
        "degradation": visual_degradation(model, processor, num_samples=DEG, **common),
    }


def test_report_shares_one_pass_and_equals_the_separate_calls(pair, tmp_path):
    model, processor = pair
    with Forwards(model) as separate:
        expected = _separate(model, processor)
    with Forwards(model) as onepass:
        report = build_report({"m": pair}, tmp_path, num_samples=N, degradation_samples=DEG, batch_size=BATCH,
                              max_key_samples=200, progress=False)  # fmt: skip
    batches, deg_batches = math.ceil(N / BATCH), math.ceil(DEG / BATCH)
    assert separate.count == 3 * batches + deg_batches  # profile, MIR, key-space: a pass each
    assert onepass.count == batches + deg_batches  # one shared pass, plus the degradation probe's own
    for metric, result in expected.items():
        assert report.results["m"][metric].to_dict() == result.to_dict(), metric  # bit-equal


def test_the_summary_joins_each_results_own_summary(pair, tmp_path):
    report = build_report({"m": pair}, tmp_path, metrics=["profile", "mir"], num_samples=N, progress=False)
    got = report.summary["m"]
    profile, result = report.results["m"]["profile"], report.results["m"]["mir"]
    assert got["mir"] == result.mir
    assert got["norm_ratio_last"] == profile.norm_ratio[-1] and got["norm_ratio_input"] == profile.norm_ratio[0]
    assert got["vision_update_cos_mean"] == pytest.approx(sum(profile.vision_update_cos) / 2, abs=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_k_before_and_after_the_norm_in_one_pass(dtype):
    # The profile wants layer K before the final norm in float32, MIR after it in the model's dtype, MIR with
    # "drop" a second pass of its own: one combined run gives each what its own run gives.
    model, processor = tiny_model("llava").to(dtype), tiny_processor("llava")
    run = RunOptions(batch_size=BATCH, progress=False)
    samples = prepare_probe(processor, None, num_samples=N, progress=False)
    mir_drop = MIROptions(outliers="drop")
    alone = {
        "profile": modality_profile(model, processor, samples, run=run),
        "mir": mir(model, processor, samples, options=mir_drop, run=run),
        "key_space": key_space_gap(model, processor, samples, run=run),
    }
    prepared = [profile_run(model, processor, samples, run=run), mir_run(model, processor, samples, options=mir_drop,
                run=run), key_space_run(model, processor, samples, run=run)]  # fmt: skip
    with Forwards(model) as forwards:
        together = run_metrics(model, processor, prepared, run)
    assert forwards.count == 2 * math.ceil(N / BATCH)  # pass 1 shared, pass 2 for MIR's outlier bounds only
    for name, result in alone.items():
        assert together[name].to_dict() == result.to_dict(), name


def test_combined_request_is_the_union():
    from hf_normalign.diagnostics.metrics.keyspace import KeySpaceAccumulator
    from hf_normalign.diagnostics.metrics.mir_capture import FeatureAccumulator
    from hf_normalign.diagnostics.metrics.profile import ProfileAccumulator

    parts = {
        "profile": ProfileAccumulator([0, 1, 2], vision_path=True),
        "mir": FeatureAccumulator([1, 2], final_norm=True),
        "keys": KeySpaceAccumulator([2], KeySpaceOptions()),
    }
    req = CombinedAccumulator(parts).request
    assert req.layers == (0, 1, 2) and req.final_norm == "both" and req.capture_keys
    assert req.dtype is None and req.output_device is None  # each part converts its own rows
    agree = CombinedAccumulator({"a": ProfileAccumulator([1, 2]), "b": ProfileAccumulator([2])}).request
    assert agree.final_norm is False and agree.dtype == torch.float32


# --- options dataclasses ----------------------------------------------------------------------------------------

CASES = {
    "mir": (mir, MIROptions, {"outliers": "drop", "layers": [2], "text_scale": False}),
    "profile": (modality_profile, ProfileOptions, {"final_norm": True, "layers": [0, 2]}),
    "key_space": (key_space_gap, KeySpaceOptions, {"max_samples": 50, "bins": 4, "unbiased": False}),
    "degradation": (visual_degradation, DegradationOptions, {"folds": 3, "ridge": 1.0, "layers": [0, 2]}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_keywords_equal_options(pair, name):
    model, processor = pair
    fn, cls, kwargs = CASES[name]
    data = {"num_samples": DEG if name == "degradation" else N}
    by_keyword = fn(model, processor, **data, **kwargs, batch_size=2, progress=False)
    by_options = fn(model, processor, **data, options=cls(**kwargs), run=RunOptions(batch_size=2, progress=False))
    assert by_keyword.to_dict() == by_options.to_dict()
    default = fn(model, processor, **data, progress=False)
    assert by_keyword.to_dict() != default.to_dict()  # the options did change something


def test_a_keyword_overrides_the_options_field(pair):
    model, processor = pair
    mixed = mir(model, processor, num_samples=N, options=MIROptions(outliers="drop"), outliers="none", progress=False)
    plain = mir(model, processor, num_samples=N, outliers="none", progress=False)
    assert mixed.to_dict() == plain.to_dict()


def test_old_keyword_calls_still_work(pair):
    model, processor = pair
    result = mir(model, processor, num_samples=4, batch_size=2, final_norm=False, layers=[-1], include_embeddings=True,
                 outliers="none", sqrt="exact", log_base=math.e, outlier_threshold=2.5, outlier_stats="numpy",
                 text_scale=True, text_tokens="passage", streaming=False, seed=1, padding_side="left", device="cpu",
                 stats_device="cpu", max_feature_gb=None, progress=False)  # fmt: skip
    assert result.layers == [0, 2] and result.settings["log_base"] == math.e and result.num_samples == 4
    assert result.settings["padding_side"] == "left" and result.settings["outlier_threshold"] == 2.5
    with pytest.raises(TypeError, match="MIROptions"):
        mir(model, processor, options=ProfileOptions())


def test_one_default_per_option():
    # outlier_threshold None means 3 sigma (1.5 IQR for "iqr") in both mir and the maths; stated once.
    assert MIROptions().outlier_threshold is None and MIROptions().outliers == "replace_median"
    assert RunOptions().batch_size == 8 and ProfileOptions().final_norm is False and MIROptions().final_norm is True


@pytest.mark.parametrize("name", list(CASES))
def test_each_public_call_resolves_the_model_once(pair, name, monkeypatch):
    import hf_normalign.model_view as model_view

    model, processor = pair
    lookups = []
    real = model_view.get_spec
    monkeypatch.setattr(model_view, "get_spec", lambda base: lookups.append(base) or real(base))
    CASES[name][0](model, processor, num_samples=DEG if name == "degradation" else N, progress=False)
    assert len(lookups) == 1  # ModelView.of once; the view travels to the runner, engine and accumulators
