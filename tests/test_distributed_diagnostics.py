"""Norm profile, key-space gap (capped sample, and keys after RoPE) and visual degradation over two CPU processes
(gloo, ``accelerate launch``) equal one process's result: the probe runner splits the batches and merges the
accumulators exactly.

Run as a script, this file is what each launched process does: every process computes the distributed results,
and the main process then also computes the one-process results on the whole probe, with the same thread count."""

import math
import sys

import pytest
from distributed import compare_in_processes, launch

COMMON = {"num_samples": 10, "batch_size": 3, "progress": False}  # 4 batches, the last one short


def _cases():
    from hf_normalign.diagnostics import key_space_gap, modality_profile, visual_degradation

    return {
        "profile": lambda m, p, **k: modality_profile(m, p, **COMMON, **k),
        "key_space_capped": lambda m, p, **k: key_space_gap(m, p, max_samples=40, bins=3, **COMMON, **k),
        "key_space_post_rope": lambda m, p, **k: key_space_gap(m, p, keys="post_rope", max_samples=None, **COMMON, **k),
        "degradation": lambda m, p, **k: visual_degradation(m, p, folds=2, **COMMON, **k),
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return launch(__file__, tmp_path_factory.mktemp("diagnostics") / "report.json")


def _assert_close(distributed, single, where=""):
    """Equal structure; numbers equal to 1e-10 relative (float64 sums taken in another order)."""
    if isinstance(single, dict):
        assert distributed.keys() == single.keys(), where
        for key in single:
            _assert_close(distributed[key], single[key], f"{where}.{key}")
    elif isinstance(single, list):
        assert len(distributed) == len(single), where
        for i, (d, s) in enumerate(zip(distributed, single, strict=True)):
            _assert_close(d, s, f"{where}[{i}]")
    elif isinstance(single, float) and math.isfinite(single):
        assert distributed == pytest.approx(single, rel=1e-10, abs=1e-12), where
    else:
        assert distributed == single, where


@pytest.mark.slow
@pytest.mark.parametrize("case", ["profile", "key_space_capped", "key_space_post_rope", "degradation"])
def test_two_processes_give_the_single_process_result(report, case):
    single, distributed = report[case]["single"], report[case]["distributed"]
    assert single["num_samples" if "num_samples" in single else "num_images"] == 10
    if case == "key_space_capped":  # the cap is reached: the sampled keys had to be merged, not just stacked
        assert single["num_vision_used"][0] == 40 < single["num_vision_keys"][0]
    _assert_close(distributed, single, case)


if __name__ == "__main__":
    compare_in_processes(sys.argv[1], _cases())
