"""MIR over two CPU processes (gloo, ``accelerate launch``) equals one process's MIR to 1e-10 relative, for the
stored-features path (3-sigma replace-median, also captured group by group) and both streaming modes.

Run as a script, this file is what each launched process does: every process computes the distributed MIR, and
the main process then also computes the one-process MIR on the whole probe, with the same thread count."""

import json
import sys

import pytest
from distributed import accelerate_launch, compare_in_processes, launch

from hf_normalign.diagnostics import mir
from hf_normalign.testing import tiny_model, tiny_processor

CASES = {
    "replace_median": {"outliers": "replace_median"},
    "replace_median_grouped": {"outliers": "replace_median", "max_feature_gb": 1e-9},  # one layer per pass
    "none": {"outliers": "none"},
    "drop": {"outliers": "drop"},
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return launch(__file__, tmp_path_factory.mktemp("mir") / "report.json")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_give_the_single_process_mir(report, case):
    single, distributed = report[case]["single"], report[case]["distributed"]
    assert distributed["num_samples"] == single["num_samples"] == 10
    for key in ("num_vision_tokens", "num_text_tokens", "num_vision_outliers", "num_text_outliers"):
        assert distributed[key] == single[key], key
    assert distributed["mir"] == pytest.approx(single["mir"], rel=1e-10, abs=0)
    assert distributed["per_layer"] == pytest.approx(single["per_layer"], rel=1e-10, abs=0)
    assert distributed["text_scale"] == pytest.approx(single["text_scale"], rel=1e-12, abs=0)


@pytest.mark.slow
def test_accelerate_launch_of_the_command_line(tmp_path):
    """`accelerate launch -m hf_normalign mir ...`: the main process prints and writes the one-process MIR."""
    model, processor = tiny_model("llava"), tiny_processor("llava")
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    out = tmp_path / "mir.json"
    options = ["--num-samples", "10", "--batch-size", "3", "--device", "cpu", "--no-progress", "--json", str(out)]
    done = accelerate_launch("-m", "hf_normalign", "mir", str(tmp_path / "m"), *options)
    assert done.stdout.count("MIR = ") == 1 and done.stdout.count(f"wrote {out}") == 1
    single = mir(model, processor, num_samples=10, batch_size=3, progress=False)
    distributed = json.loads(out.read_text())
    assert distributed["num_samples"] == single.num_samples == 10
    assert distributed["mir"] == pytest.approx(single.mir, rel=1e-10, abs=0)
    assert distributed["per_layer"] == pytest.approx(single.per_layer, rel=1e-10, abs=0)


def _mir_cases():
    common = {"num_samples": 10, "batch_size": 3, "progress": False}  # 4 batches, the last one short
    return {name: lambda m, p, o=options, **k: mir(m, p, **common, **o, **k) for name, options in CASES.items()}


if __name__ == "__main__":
    compare_in_processes(sys.argv[1], _mir_cases())
