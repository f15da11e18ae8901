"""Issue: `normalign demo`. A miniature run end to end (report, table, results, checkpoint) and its parts."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys

import pytest
import torch
from browser import assert_readable, require_chromium
from plot_pixels import pixels_of, render

import hf_normalign as normalign
from hf_normalign.demo import VARIANTS, DemoConfig, run_demo
from hf_normalign.demo.data import (
    ATTRIBUTE_WORDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    build_tokenizer,
    make_splits,
    pretraining_corpus,
)
from hf_normalign.demo.models import NUM_IMAGE_TOKENS, build_model, build_processor, vision_feature_norm
from hf_normalign.demo.report import format_table, plot_training, spread_sentence
from hf_normalign.demo.training import batch_order, encode
from hf_normalign.diagnostics import plots

# Every number a variant must report, finite.
METRICS = (
    "caption_loss",
    "token_accuracy",
    "content_accuracy",
    "colour_accuracy",
    "shape_accuracy",
    "position_accuracy",
    "unseen_content_accuracy",
    "mir",
    "train_seconds",
)
TINY = DemoConfig.quick(
    train_images=48, heldout_images=24, lm_lines=60, lm_steps=4, steps=4, batch_size=8, probe_samples=6
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One miniature run (seconds), shared by the end-to-end tests."""
    return run_demo(TINY, tmp_path_factory.mktemp("demo"), progress=False, log=None)


@pytest.mark.slow
def test_report_and_table_name_every_variant(demo):
    page = demo.report.read_text(encoding="utf-8")
    assert (demo.out_dir / "diagnostics" / "report.html").exists()
    for name in VARIANTS:
        assert name in page
        assert any(line.startswith(name) for line in demo.table.splitlines())
    assert page.count("data:image/png;base64,") >= 5  # examples, training curves, norms, update rate, MIR
    for href in ("examples.png", "training.png", "diagnostics/norms.png", "diagnostics/report.html"):
        assert f'href="{href}"' in page and (demo.out_dir / href).exists()
    assert 'href="../report.html"' in (demo.out_dir / "diagnostics" / "report.html").read_text(encoding="utf-8")
    for term in ("GWC", "MoCa", "PRe", "FID", "MIR", "layer numbering", "final norm", "units"):
        assert f"<dt>{term}</dt>" in page, term
    assert "One seed: each number is one run, and no spread was measured" in page
    assert "±" not in demo.table  # one seed: plain numbers


@pytest.mark.slow
def test_every_variant_is_drawn_in_the_training_plot(demo):
    fig = plot_training(demo.results)
    image = render(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(VARIANTS)
    for name, style in plots.variant_styles(list(VARIANTS)).items():
        assert pixels_of(image, ax, style["color"]) > 20, name
        assert pixels_of(image, ax.get_legend(), style["color"]) > 5, name
    plots.pyplot().close(fig)


@pytest.mark.slow
def test_demo_report_renders_in_headless_chromium(demo, tmp_path):
    browser = require_chromium()
    assert_readable(browser, demo.report, tmp_path)
    assert_readable(browser, demo.out_dir / "diagnostics" / "report.html", tmp_path)


@pytest.mark.slow
def test_seeds_give_mean_and_std_of_the_single_seed_runs(tmp_path):
    """Two seeds in one run = the two one-seed runs, averaged (std with n - 1), and the table says so."""
    two = run_demo(dataclasses.replace(TINY, seeds=2), tmp_path / "two", progress=False, log=None)
    singles = [
        run_demo(dataclasses.replace(TINY, seed=s), tmp_path / f"seed{s}", progress=False, log=None).results
        for s in (0, 1)
    ]
    assert two.results["seeds"] == [0, 1]
    for name, row in two.results["variants"].items():
        for key in ("caption_loss", "content_accuracy", "mir"):
            values = [r["variants"][name][key] for r in singles]
            assert row["per_seed"][key] == pytest.approx(values, abs=1e-6)
            assert row[key] == pytest.approx(statistics.mean(values), abs=1e-6)
            assert row["std"][key] == pytest.approx(statistics.stdev(values), abs=1e-6)
        assert row["samples"] == singles[0]["variants"][name]["samples"]  # examples: the first seed's
    baseline = two.results["variants"]["baseline"]
    expected = f"{baseline['caption_loss']:.3f} ± {baseline['std']['caption_loss']:.3f}"
    assert next(line for line in two.table.splitlines() if line.startswith("baseline")).split()[1:4] == (
        expected.split())  # fmt: skip
    assert (two.out_dir / "diagnostics-seed1" / "report.html").exists()
    assert "Over 2 seeds" in two.report.read_text(encoding="utf-8")


def test_spread_sentence_names_only_differences_beyond_the_spread():
    rows = {
        "baseline": {"caption_loss": 0.50, "mir": 3.0, "std": {"caption_loss": 0.02, "mir": 0.1}},
        "ln": {"caption_loss": 0.53, "mir": 0.6, "std": {"caption_loss": 0.02, "mir": 0.05}},  # 0.03 < 0.04
        "moca": {"caption_loss": 0.40, "mir": 3.1, "std": {"caption_loss": 0.01, "mir": 0.1}},  # 0.10 > 0.03
    }
    sentence = spread_sentence({"variants": rows, "seeds": [0, 1, 2]})
    assert sentence == (
        "Over 3 seeds, differences to baseline larger than the two spreads added: ln MIR -2.400; moca loss -0.100. "
        "All other differences are within the spread."
    )
    assert spread_sentence({"variants": {k: {"mir": r["mir"]} for k, r in rows.items()}}) == ""  # one seed
    close = {k: {**r, "std": {"caption_loss": 1.0, "mir": 5.0}} for k, r in rows.items()}
    assert "no difference to baseline exceeds" in spread_sentence({"variants": close, "seeds": [0, 1]})
    assert "± 0.020" in format_table({"variants": rows, "seeds": [0, 1, 2]})


@pytest.mark.slow
def test_results_json_has_every_variant_with_finite_numbers(demo):
    results = json.loads(demo.results_json.read_text(encoding="utf-8"))
    assert list(results["variants"]) == list(VARIANTS)
    for name, row in results["variants"].items():
        for key in METRICS:
            assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key, row[key])
        assert len(row["history"]["loss"]) == TINY.steps
        with_pre = VARIANTS[name] is not None and VARIANTS[name].pre is not None
        assert len(row["history"]["pre_loss"]) == (TINY.steps if with_pre else 0)
        profile = row["profile"]
        assert all(math.isfinite(v) for v in profile["vision_norm_mean"] + profile["vision_update_cos"])
        assert len(row["samples"]) == len(results["examples"])
    assert results["checkpoint"]["equal"] is True


@pytest.mark.slow
def test_reloaded_checkpoint_equals_the_trained_model(demo):
    saved = demo.models["all three"]
    reloaded = normalign.from_pretrained(demo.checkpoint).eval()
    assert normalign.get_config(reloaded) == normalign.get_config(saved)
    split = make_splits(TINY.seed, TINY.train_images, TINY.heldout_images)
    batch = encode(demo.processor, split.heldout[:4]).inputs
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, saved(**batch).logits)
    assert demo.checkpoint_equal


@pytest.mark.slow
def test_stage1_trains_only_the_projector_and_plugin(demo):
    """Every variant keeps the same frozen vision tower and LLM; the projectors moved apart."""
    frozen = ("model.vision_tower.", "model.language_model.", "lm_head.")
    reference = demo.models["baseline"].state_dict()
    for name, model in demo.models.items():
        assert normalign.is_patched(model) == (VARIANTS[name] is not None)
        state = model.state_dict()
        for key, value in reference.items():
            if key.startswith(frozen):
                assert torch.equal(state[key], value), (name, key)
            elif name != "baseline" and key.startswith("model.multi_modal_projector."):
                assert not torch.equal(state[key], value), (name, key)


@pytest.mark.slow
def test_cli_help():
    out = subprocess.run(
        [sys.executable, "-m", "hf_normalign", "demo", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--quick", "--out", "--seed", "--seeds", "--steps"):
        assert flag in out.stdout


# --- parts ------------------------------------------------------------------------------------------------


def test_splits_are_deterministic_and_hold_out_combinations():
    split = make_splits(seed=3, num_train=300, num_heldout=90)
    assert split == make_splits(seed=3, num_train=300, num_heldout=90)
    assert len(split.unseen_combinations) == round(0.1 * len(COLOURS) * len(SHAPES) * len(POSITIONS))
    assert not any(s.combination in split.unseen_combinations for s in split.train)
    assert sum(s.combination in split.unseen_combinations for s in split.heldout) == 30
    assert not {s.seed for s in split.train} & {s.seed for s in split.heldout}
    image = split.train[0].image()
    assert image.size == (64, 64) and image.mode == "RGB"


def test_tokenizer_covers_the_corpus_and_the_captions():
    tokenizer = build_tokenizer()
    lines = pretraining_corpus(seed=0, num_lines=300)
    ids = tokenizer(lines).input_ids
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert tokenizer.decode(tokenizer(lines[0]).input_ids, skip_special_tokens=True) == lines[0]
    assert tokenizer.image_token == "<image>"


def test_labels_cover_exactly_the_caption():
    processor = build_processor(build_tokenizer())
    split = make_splits(seed=0, num_train=4, num_heldout=0)
    data = encode(processor, split.train)
    tokenizer = processor.tokenizer
    for i, scene in enumerate(split.train):
        labels = data.inputs["labels"][i]
        assert tokenizer.decode(labels[labels != -100]) == f"{scene.caption} </s>"
        words = tokenizer.convert_ids_to_tokens(data.inputs["input_ids"][i][data.attribute[i] > 0].tolist())
        assert words == [w for w in scene.caption.split() if any(w in ws for ws in ATTRIBUTE_WORDS.values())]
    assert int((data.inputs["input_ids"][0] == tokenizer.image_token_id).sum()) == NUM_IMAGE_TOKENS == 16


def test_vision_tokens_are_loud_against_text():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    pixels = encode(build_processor(tokenizer), make_splits(0, 8, 0).train).inputs["pixel_values"]
    features, projected = vision_feature_norm(model, pixels)
    text = model.get_input_embeddings().weight[5:].norm(dim=-1).mean()
    assert 35 < features < 45  # the arranged loudness, ~40
    assert projected > 20 and projected > 50 * text  # vision tokens entering the LLM vs text embeddings


def test_batch_order_is_shared_and_covers_epochs():
    order = batch_order(10, 4, steps=5, seed=0)
    assert [b.tolist() for b in order] == [b.tolist() for b in batch_order(10, 4, steps=5, seed=0)]
    assert len(order) == 5 and all(len(b) == 4 for b in order)


def test_presets_seeds():
    assert DemoConfig.quick().seeds == 1 and DemoConfig.full().seeds == 3


@pytest.mark.parametrize(
    "bad", [{"steps": 0}, {"train_images": 4, "batch_size": 8}, {"probe_samples": 1}, {"seeds": 0}]
)
def test_config_rejects_impossible_budgets(bad):
    with pytest.raises(ValueError):
        DemoConfig.quick(**bad)
