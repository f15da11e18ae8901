"""The from-scratch protocol offline: a `build:` recipe (tiny CLIP + tiny Llama) -> stage 1 -> stage 2."""

import json

import pytest
import torch
import transformers as tf
import yaml

import hf_normalign as normalign
from hf_normalign.build import materialize
from hf_normalign.patching import get_plugin
from hf_normalign.testing import tiny_tokenizer

# isort: split
from hf_normalign.recipes import train
from hf_normalign.recipes.make_tiny_data import make_tiny_data

_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=32)
_LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    vision = tf.CLIPVisionModel(tf.CLIPVisionConfig(**_VIT, patch_size=8))
    vision.save_pretrained(root / "vision")
    lm = tf.LlamaForCausalLM(tf.LlamaConfig(**_LM, vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    lm.save_pretrained(root / "lm")
    tiny_tokenizer("llava").save_pretrained(root / "lm")
    make_tiny_data(root / "tiny", num_samples=8)
    return root, lm


def write_config(path, root, save_dir=None, **extra):
    config = {
        "build": {
            "vision_model": str(root / "vision"),
            "language_model": str(root / "lm"),
            "save_dir": str(save_dir or root / "base"),
        },
        "methods": "projector_norm,moca,pre",
        "data_path": str(root / "tiny" / "data.json"),
        "use_cpu": True,
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "save_steps": 2,
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_stage1_from_built_parts_then_stage2(parts, tmp_path):
    root, lm = parts
    stage1 = tmp_path / "stage1"
    cfg = write_config(tmp_path / "s1.yaml", root)
    assert train.main(["--config", cfg, "--output_dir", str(stage1)], stage=1) == 0

    aligned = normalign.from_pretrained(str(stage1))
    assert normalign.get_config(aligned).methods == ["projector_norm", "moca", "pre"]
    # Stage 1 trains projector + plugin only: the LLM is still the base LLM, bit for bit.
    base_state, got = lm.model.state_dict(), aligned.model.language_model.state_dict()
    assert all(torch.equal(got[k], base_state[k]) for k in base_state)
    built = tf.LlavaForConditionalGeneration.from_pretrained(root / "base")
    assert not torch.equal(
        aligned.model.multi_modal_projector.linear_1.weight, built.model.multi_modal_projector.linear_1.weight
    )

    stage2 = tmp_path / "stage2"
    argv = [
        "--model_name_or_path", str(stage1), "--data_path", str(root / "tiny" / "data.json"),
        "--output_dir", str(stage2), "--use_cpu", "true", "--per_device_train_batch_size", "4",
        "--max_steps", "2", "--save_steps", "2", "--disable_tqdm", "true",
    ]  # fmt: skip
    assert train.main(argv, stage=2) == 0
    final = normalign.from_pretrained(str(stage2))
    assert not torch.equal(get_plugin(final).moca.layer_0_norm.scale, get_plugin(aligned).moca.layer_0_norm.scale)


def test_build_section_errors_are_config_errors(parts, tmp_path):
    root, _ = parts
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"build": {"vision_model": str(root / "vision"), "language_model": "x"}}))
    with pytest.raises(train.ConfigError, match="save_dir"):
        train.parse_args(["--config", str(cfg), "--output_dir", str(tmp_path / "o")], stage=1)


def _bad_rows(root, tmp_path):
    """The tiny data with a missing image in row 3: a data error, found when the Trainer is set up."""
    records = json.loads((root / "tiny" / "data.json").read_text())
    records[3]["image"] = "images/missing.png"
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return {"data_path": str(path), "image_folder": str(root / "tiny")}


@pytest.mark.parametrize("error", ["mir_samples", "missing_data", "bad_row"])
def test_later_config_error_builds_and_writes_nothing(parts, tmp_path, capsys, error):
    """Parsing only checks the build: section; a config error after it (or a bad data row, found when the Trainer
    is set up, before the build) leaves no built model behind, and no output directory."""
    root, _ = parts
    extra = {
        "mir_samples": {"mir_every": 1, "mir_samples": 1},
        "missing_data": {"data_path": str(tmp_path / "nope.json")},
        "bad_row": _bad_rows(root, tmp_path),
    }[error]
    cfg = write_config(tmp_path / "cfg.yaml", root, save_dir=tmp_path / "base", **extra)
    assert train.main(["--config", cfg, "--output_dir", str(tmp_path / "out")], stage=1) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "base").exists()
    assert not (tmp_path / "base.partial").exists()


def test_build_runs_when_the_trainer_is_set_up(parts, tmp_path):
    root, lm = parts
    cfg = write_config(tmp_path / "cfg.yaml", root, save_dir=tmp_path / "base")
    config = train.parse_args(["--config", cfg, "--output_dir", str(tmp_path / "out")], stage=1)
    assert config.model.model_name_or_path == str(tmp_path / "base") and not (tmp_path / "base").exists()

    trainer = train.build_trainer(config)
    built = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")
    assert all(torch.equal(built.model.language_model.state_dict()[k], v) for k, v in lm.model.state_dict().items())
    # The Trainer trains that model, patched.
    assert normalign.is_patched(trainer.model)
    expected = built.state_dict()
    got = {k: v for k, v in trainer.model.state_dict().items() if not k.startswith("normalign.")}
    assert got.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in got.items())

    # A model named on the command line replaces the build section: nothing is built then.
    other = write_config(tmp_path / "other.yaml", root, save_dir=tmp_path / "other")
    named = ["--model_name_or_path", str(tmp_path / "base"), "--output_dir", str(tmp_path / "out2")]
    config = train.parse_args(["--config", other, *named], stage=1)
    assert config.build is None
    train.build_trainer(config)
    assert not (tmp_path / "other").exists()


def test_materialize_writes_save_dir_whole_or_not_at_all(parts, tmp_path, monkeypatch):
    """A build that dies after the model is written leaves no save_dir (a later run would reuse it, processor
    missing); the next build clears what a killed one left in `<save_dir>.partial` and writes it whole."""
    root, _ = parts
    section = {
        "vision_model": str(root / "vision"),
        "language_model": str(root / "lm"),
        "save_dir": str(tmp_path / "b"),
    }

    def dies(self, *args, **kwargs):
        raise KeyboardInterrupt  # as a process killed between the model and the processor would stop

    with monkeypatch.context() as m:
        m.setattr(tf.LlavaProcessor, "save_pretrained", dies)
        with pytest.raises(KeyboardInterrupt):
            materialize(section)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.partial" / "config.json").exists()

    assert materialize(section) == str(tmp_path / "b")
    assert not (tmp_path / "b.partial").exists()
    processor = tf.AutoProcessor.from_pretrained(tmp_path / "b")
    model = tf.AutoModelForImageTextToText.from_pretrained(tmp_path / "b")
    assert type(processor).__name__ == "LlavaProcessor" and type(model).__name__ == "LlavaForConditionalGeneration"

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and holds no built model"):
        materialize({**section, "save_dir": str(tmp_path / "other")})
