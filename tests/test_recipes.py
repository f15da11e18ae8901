"""The stage-1 / stage-2 recipes end to end on a tiny LLaVA: checkpoints, frozen parts, resume, DDP, config errors."""

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REQUIRED_FAMILIES
from distributed import accelerate_launch, assert_same_saved_weights
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

import hf_normalign as normalign
from hf_normalign.patching import get_plugin
from hf_normalign.recipes import config as recipe_config
from hf_normalign.recipes import train
from hf_normalign.recipes.make_tiny_data import make_tiny_data
from hf_normalign.registry import get_spec
from hf_normalign.testing import tiny_model

VISION_TOWER, PROJECTOR = "model.vision_tower.", "model.multi_modal_projector."


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """tiny/data.json (16 rows), tiny/images/, tiny/model/ (tiny LLaVA + processor): what the docs' commands use."""
    root = tmp_path_factory.mktemp("recipes")
    make_tiny_data(root / "tiny", num_samples=16, model="llava")
    return root


def argv(workspace, out, **options) -> list[str]:
    """Command line of a tiny run; ``options`` override the defaults (None drops one)."""
    tiny = workspace / "tiny"
    values = {
        "model_name_or_path": tiny / "model",
        "methods": "projector_norm,moca,pre",
        "data_path": tiny / "data.json",
        "output_dir": out,
        "use_cpu": "true",
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "save_steps": 3,
        "logging_steps": 1,
        "disable_tqdm": "true",
        "seed": 0,
    } | options
    return [item for key, value in values.items() if value is not None for item in (f"--{key}", str(value))]


def history(output_dir) -> list[dict]:
    """The Trainer's log history, from the last checkpoint's trainer_state.json."""
    last = max((d for d in os.listdir(output_dir) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    with open(os.path.join(output_dir, last, "trainer_state.json")) as f:
        return json.load(f)["log_history"]


def losses(output_dir, key="loss") -> list[float]:
    return [entry[key] for entry in history(output_dir) if key in entry and "train_runtime" not in entry]


def plain_state(path) -> dict[str, torch.Tensor]:
    with normalign.autoload(False):
        return AutoModelForImageTextToText.from_pretrained(path).state_dict()


# --- stage 1 -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1(workspace):
    """The documented tiny stage-1 run (hf_normalign/recipes/configs/tiny_stage1.yaml, run from the workspace), with
    MIR and a push to the Hub (intercepted)."""
    pushes = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workspace)
        mp.setattr(normalign, "push_to_hub", lambda *args, **kwargs: pushes.append((args, kwargs)))
        code = train.main(
            [
                *("--config", "tiny_stage1", "--disable_tqdm", "true"),
                *("--mir_every", "4", "--mir_samples", "4", "--push-to-hub", "me/tiny-aligned"),
            ],
            stage=1,
        )
    assert code == 0
    return workspace / "tiny" / "stage1", pushes


@pytest.mark.slow
def test_stage1_checkpoint_loads_and_frozen_parts_are_bit_identical(workspace, stage1):
    output_dir, _ = stage1
    model = normalign.from_pretrained(output_dir)
    before = plain_state(workspace / "tiny" / "model")
    after = {k: v for k, v in model.state_dict().items() if not k.startswith("normalign.")}
    assert after.keys() == before.keys()
    frozen = [k for k in before if not k.startswith(PROJECTOR)]
    assert any(k.startswith(VISION_TOWER) for k in frozen) and "lm_head.weight" in frozen
    assert all(torch.equal(after[k], before[k]) for k in frozen)  # vision tower, LLM, lm_head: bit-identical
    assert all(not torch.equal(after[k], before[k]) for k in before if k.startswith(PROJECTOR))

    torch.manual_seed(0)  # the recipe's seed: the same plugin initialisation
    fresh = normalign.patch(
        AutoModelForImageTextToText.from_pretrained(workspace / "tiny" / "model"), normalign.get_config(model)
    )
    initial, trained = fresh.normalign.state_dict(), model.normalign.state_dict()
    assert all(not torch.equal(trained[k], initial[k]) for k in initial)  # every plugin tensor trained

    processor = AutoProcessor.from_pretrained(output_dir)
    assert type(processor).__name__ == "LlavaProcessor"
    assert set(os.listdir(output_dir / "checkpoint-4")) >= {"normalign.safetensors", "normalign_config.json"}


@pytest.mark.slow
def test_stage1_logs_pre_loss_and_mir_and_pushes(stage1):
    output_dir, pushes = stage1
    steps = [e for e in history(output_dir) if "loss" in e]
    assert {1, 2, 3, 5, 6, 7} <= {e["step"] for e in steps}
    assert all("pre_loss" in e and e["pre_loss"] > 0 for e in steps)
    assert [e["step"] for e in history(output_dir) if "mir" in e] == [4, 8]
    ((args, kwargs),) = pushes
    assert args == (os.path.join("tiny", "stage1"), "me/tiny-aligned")
    assert isinstance(kwargs["mir"].mir, float)


@pytest.mark.slow
def test_mir_steps_keep_their_loss_entry(stage1):
    output_dir, _ = stage1
    assert {e["step"] for e in history(output_dir) if "loss" in e} == set(range(1, 9))


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
@pytest.mark.parametrize("stage", [1, 2])
def test_freezing_rules_per_family(family, stage):
    model = normalign.patch(tiny_model(family), methods=["projector_norm", "moca", "pre"])
    spec = get_spec(model)
    config = SimpleNamespace(stage=stage, model=SimpleNamespace(lora=False, qlora=False), baseline=False)
    train.setup_stage(model, config)
    projectors = tuple(f"{p}." for p in train.projector_paths(model))
    assert len(projectors) == (2 if family == "qwen3_vl" else 1)  # + the deepstack mergers
    for name, param in model.named_parameters():
        if name.startswith(("normalign.", *projectors)):
            assert param.requires_grad, name
        elif stage == 1 or name.startswith(f"{spec.vision_tower}."):
            assert not param.requires_grad, name
        else:
            assert param.requires_grad, name  # stage 2: LLM, lm_head and any other glue


# --- stage 2 -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_stage2_runs_and_loads(workspace, stage1, tmp_path, mode):
    stage1_dir, _ = stage1
    options = {"model_name_or_path": stage1_dir, "methods": None, "max_steps": 4, "save_steps": 4}
    if mode != "full":
        options[mode] = "true"
    assert train.main(argv(workspace, tmp_path, **options), stage=2) == 0

    model = normalign.from_pretrained(tmp_path)
    before, after = plain_state(stage1_dir), model.state_dict()
    vision = [k for k in before if k.startswith(VISION_TOWER)]
    llm = [k for k in before if k.startswith("model.language_model.") and "layers" in k and "proj" in k]
    assert all(torch.equal(after[k], before[k]) for k in vision)
    assert all(not torch.equal(after[k], before[k]) for k in before if k.startswith(PROJECTOR))
    if mode == "qlora":
        # Adapter form: the base (stage-1 output) with the trained plugin and projector; LoRA comes from PEFT.
        assert normalign.read_checkpoint_info(tmp_path).adapter_only
        assert all(torch.equal(after[k], before[k]) for k in llm)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, tmp_path)
        assert normalign.is_patched(model)
    else:
        assert all(not torch.equal(after[k], before[k]) for k in llm)  # trained, or LoRA merged into it
    initial = load_file(stage1_dir / "normalign.safetensors")
    assert any(not torch.equal(v, get_plugin(model).state_dict()[k]) for k, v in initial.items())


@pytest.mark.slow
def test_lora_checkpoint_holds_the_adapter_plugin_and_projector(workspace, tmp_path, monkeypatch):
    """A LoRA run's checkpoint-N: PEFT's adapter beside hf-normalign's adapter files (plugin, projector), on the
    base named by its absolute path (a relative one only resolves from where the run started)."""
    monkeypatch.chdir(workspace)
    options = {"model_name_or_path": "tiny/model", "lora": "true", "max_steps": 2, "save_steps": 2}
    trainer = train.run(train.parse_args(argv(workspace, tmp_path / "out", **options), stage=2))
    checkpoint = tmp_path / "out" / "checkpoint-2"
    names = set(os.listdir(checkpoint))
    assert {n for n in names if n.startswith("normalign")} == {
        "normalign_config.json",
        "normalign.safetensors",
        "normalign_modules.safetensors",
    }
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    with open(checkpoint / "normalign_config.json") as f:
        saved = json.load(f)
    assert saved["adapter_only"] and saved["base_model_name_or_path"] == str(workspace / "tiny" / "model")
    # The weights at step 2 are the run's last: the trained plugin and projector, read off the model itself.
    base = trainer.model.get_base_model()
    expected = {
        "normalign.safetensors": base.normalign.state_dict(),
        "normalign_modules.safetensors": {
            f"model.multi_modal_projector.{k}": v for k, v in base.model.multi_modal_projector.state_dict().items()
        },
    }
    for name, tensors in expected.items():
        got = load_file(checkpoint / name)
        assert got.keys() == tensors.keys(), name
        assert all(torch.equal(got[k], v) for k, v in tensors.items()), name


@pytest.mark.slow
def test_tiny_stage2_config_continues_from_the_stage1_output(workspace, stage1, monkeypatch):
    monkeypatch.chdir(workspace)
    config = train.parse_args(["--config", "tiny_stage2"], stage=2)
    assert config.normalign_config is None  # the methods come from the aligned checkpoint
    assert config.model_source == "tiny/stage1" and config.training.learning_rate == 1e-4


# --- resume ------------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


class InterruptAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted


@pytest.mark.slow
@pytest.mark.parametrize("stage, options", [(1, {}), (2, {"lora": "true"})], ids=["stage1", "stage2-lora"])
def test_interrupted_then_resumed_run_equals_uninterrupted(workspace, tmp_path, stage, options):
    """6 steps with checkpoints every 3: a run killed at step 4 and resumed from checkpoint-3 ends bit-identical to
    the uninterrupted run (single process on CPU is deterministic, and the optimizer, scheduler, RNG and data
    order are restored with the weights)."""
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert train.main(argv(workspace, full, **options), stage=stage) == 0

    trainer = train.build_trainer(train.parse_args(argv(workspace, broken, **options), stage=stage))
    trainer.add_callback(InterruptAt(4))
    with pytest.raises(Interrupted):
        trainer.train()
    assert sorted(d for d in os.listdir(broken) if d.startswith("checkpoint-")) == ["checkpoint-3"]
    assert train.main(argv(workspace, broken, resume_from_checkpoint="true", **options), stage=stage) == 0

    for name in ("normalign.safetensors", "model.safetensors"):  # plugin; projector and (stage 2) merged LLM
        expected, got = load_file(full / name), load_file(broken / name)
        assert all(torch.equal(got[k], v) for k, v in expected.items()), name
    assert losses(broken)[-3:] == losses(full)[-3:]
    assert normalign.read_checkpoint_info(broken) == normalign.read_checkpoint_info(full)  # same base recorded


# --- multi-process -----------------------------------------------------------------------------------------------


def _ddp_run(workspace, output_dir, methods):
    """Two CPU processes, 2 rows each: the same global batch of 4. The launched script is this file (its
    ``__main__`` block runs the stage-1 entry point)."""
    accelerate_launch(__file__, *argv(workspace, output_dir, methods=methods, per_device_train_batch_size=2))


@pytest.fixture(scope="module")
def ddp_runs(workspace, tmp_path_factory):
    """(single-process, two-process) output directories per method set."""
    runs = {}
    for methods in ("projector_norm,moca", "projector_norm,moca,pre"):
        single, ddp = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ddp")
        assert train.main(argv(workspace, single, methods=methods), stage=1) == 0
        _ddp_run(workspace, ddp, methods)
        runs[methods] = single, ddp
    return runs


@pytest.mark.slow
def test_ddp_loss_trajectory_matches_single_process(ddp_runs):
    """Measured: relative loss differences <= 2e-7 and weight differences <= 6e-8 (gradient all-reduce order)."""
    single, ddp = ddp_runs["projector_norm,moca"]
    assert len(losses(ddp)) == 6
    torch.testing.assert_close(losses(ddp), losses(single), rtol=1e-5, atol=0)
    torch.testing.assert_close(losses(ddp, "grad_norm"), losses(single, "grad_norm"), rtol=1e-5, atol=0)
    assert_same_saved_weights(single, ddp)


@pytest.mark.slow
def test_ddp_with_pre_trains_like_single_process(ddp_runs):
    """With PRe the updates match too (gradient norms, final weights); the logged losses: see the next test."""
    single, ddp = ddp_runs["projector_norm,moca,pre"]
    torch.testing.assert_close(losses(ddp, "grad_norm"), losses(single, "grad_norm"), rtol=1e-5, atol=0)
    assert_same_saved_weights(single, ddp)


@pytest.mark.slow
def test_ddp_with_pre_logs_like_single_process(ddp_runs):
    single, ddp = ddp_runs["projector_norm,moca,pre"]
    torch.testing.assert_close(losses(ddp), losses(single), rtol=1e-5, atol=0)
    torch.testing.assert_close(losses(ddp, "pre_loss"), losses(single, "pre_loss"), rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("methods", ["projector_norm,moca", "projector_norm,moca,pre"])
def test_ddp_entry_point_closes_the_process_group(ddp_runs, methods):
    """The recipe's entry point returns with the group closed on every rank. With it open, a rank that exits while
    the main process still saves aborts in gloo's teardown ("terminate called without an active exception"): about
    one launch in two when the main process is 3 s behind, which failed CI now and then."""
    ddp = ddp_runs[methods][1]
    for rank in (0, 1):
        with open(f"{ddp}-rank{rank}.json") as f:
            assert json.load(f) == {"returncode": 0, "group_open": False}


# --- configuration and data errors -------------------------------------------------------------------------------


def _bad_yaml(workspace, text):
    path = workspace / f"bad{abs(hash(text))}.yaml"
    path.write_text(text)
    return str(path)


CONFIG_ERRORS = {
    "unknown-yaml-key": (1, {"config": "yaml:lerning_rate: 0.1\n"}, "unknown option(s) ['lerning_rate']"),
    "bad-yaml-value": (1, {"config": "yaml:learning_rate: fast\n"}, "invalid value 'fast' for learning_rate"),
    "yaml-not-a-mapping": (1, {"config": "yaml:- a\n- b\n"}, "must hold a mapping"),
    "missing-config": (1, {"config": "nope.yaml"}, "config file 'nope.yaml' not found"),
    "lora-in-stage-1": (1, {"lora": "true"}, "--lora/--qlora are stage-2 options"),
    "lora-and-qlora": (2, {"lora": "true", "qlora": "true"}, "exclusive"),
    "unknown-method": (1, {"methods": "projector_norm,magic"}, "invalid hf-normalign settings"),
    "no-method": (1, {"methods": None}, "pass --methods"),
    "methods-and-config": (1, {"normalign_config": '{"moca": true}'}, "either --methods or --normalign_config"),
    "missing-data": (1, {"data_path": "nope.json"}, "data_path nope.json does not exist"),
    "missing-image-folder": (1, {"image_folder": "nope"}, "image_folder nope is not a directory"),
    "bad-dtype": (1, {"dtype": "int8"}, "--dtype must be one of"),
    "bad-template": (1, {"chat_template": "chatml"}, "--chat_template"),
    "no-output-dir": (1, {"output_dir": None}, "--output_dir is required"),
    "no-checkpoint-to-resume": (1, {"resume_from_checkpoint": "true"}, "no checkpoint-* in"),
    "bad-hub-repo": (1, {"push-to-hub": "not a repo//id"}, "--push-to-hub"),
    "missing-model": (1, {"model_name_or_path": "/nonexistent/model"}, "not found"),
    "trainer-argument": (1, {"warmup_steps": -1}, "warmup_steps"),  # transformers' own message varies by release
    "yaml-bad-choice": (1, {"config": "yaml:lr_scheduler_type: wobbly\n"}, "wobbly"),
    "one-mir-sample": (1, {"mir_every": 1, "mir_samples": 1}, "--mir_samples >= 2"),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS, ids=list(CONFIG_ERRORS))
def test_config_error_writes_nothing(workspace, tmp_path, capsys, case):
    stage, options, message = CONFIG_ERRORS[case]
    options = dict(options)
    if str(options.get("config", "")).startswith("yaml:"):
        options["config"] = _bad_yaml(workspace, options["config"][5:])
    out = tmp_path / "out"
    assert train.main(argv(workspace, out, **options), stage=stage) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_methods_must_match_an_aligned_checkpoint(workspace, tmp_path, capsys):
    aligned = tmp_path / "aligned"
    model = normalign.patch(AutoModelForImageTextToText.from_pretrained(workspace / "tiny" / "model"), methods="moca")
    model.save_pretrained(aligned)
    out = tmp_path / "out"
    code = train.main(argv(workspace, out, model_name_or_path=aligned, methods="projector_norm"), stage=2)
    assert code == 2 and "is an aligned checkpoint with" in capsys.readouterr().err
    assert not out.exists()


def test_usage_error_exits_before_writing(workspace, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        train.main([*argv(workspace, out), "--no_such_option", "1"], stage=1)
    assert info.value.code == 2 and not out.exists()


def test_bad_data_row_fails_before_writing_unless_skipped(workspace, tmp_path, capsys, caplog):
    with open(workspace / "tiny" / "data.json") as f:
        records = json.load(f)
    records[5]["image"] = "images/missing.png"
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    options = {"data_path": data, "image_folder": workspace / "tiny", "max_steps": 1, "save_steps": 10}
    assert train.main(argv(workspace, out, **options), stage=1) == 2
    assert "row 5 (id '00005'): missing image file" in capsys.readouterr().err
    assert not out.exists()
    assert train.main(argv(workspace, out, skip_bad_rows="true", **options), stage=1) == 0
    assert "skipped 1 of 16 rows (1 missing image file)" in caplog.text
    assert normalign.read_checkpoint_info(out).config.methods == ["projector_norm", "moca", "pre"]


def test_packaged_yaml_configs_are_valid():
    names = sorted(os.listdir(train.CONFIG_DIR))
    families = {n.rsplit("_stage", 1)[0] for n in names}
    assert families >= {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl"}
    for name in names:
        stage = 1 if name.endswith(("stage1.yaml", "pretrain.yaml")) else 2
        path = os.path.join(train.CONFIG_DIR, name)
        values, hub = recipe_config._yaml_defaults(path, recipe_config._parser(stage))
        with open(path) as f:  # paper-protocol configs build the base model instead of naming one
            values.update({"model_name_or_path": True} if "build" in yaml.safe_load(f) else {})
        assert {"model_name_or_path", "data_path", "output_dir"} <= values.keys() and hub is None, name
        if stage == 1:
            assert not values.get("lora") and not values.get("qlora"), name


def test_help_lists_the_recipe_options(capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--help"], stage=2)
    text = capsys.readouterr().out
    assert info.value.code == 0
    assert all(option in text for option in ("--qlora", "--skip_bad_rows", "--mir_every", "--push-to-hub REPO"))


# --- issue 12: earlier runs, resume of another configuration, unreadable data ------------------------------------


def test_output_dir_holding_an_earlier_run_is_refused(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    assert train.main(argv(workspace, out), stage=1) == 2
    assert "holds an earlier run (checkpoint-3)" in capsys.readouterr().err
    assert os.listdir(out) == ["checkpoint-3"]
    config = train.parse_args(argv(workspace, out, overwrite_output_dir="true"), stage=1)
    assert config.recipe.overwrite_output_dir


def test_resume_from_a_run_of_another_configuration_is_refused(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    model = normalign.patch(AutoModelForImageTextToText.from_pretrained(workspace / "tiny" / "model"), methods="moca")
    model.save_pretrained(out / "checkpoint-3")
    capsys.readouterr()
    assert train.main(argv(workspace, out, resume_from_checkpoint="true"), stage=1) == 2
    err = capsys.readouterr().err
    assert "was trained with" in err and "moca" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("content", "phrase"),
    [('{"id": 1}', "must hold a JSON list"), ("[{", "not valid JSON"), (b"\xff\xfe[", "line 1 is not UTF-8 text")],
)
def test_unreadable_data_is_one_line_and_status_2(workspace, tmp_path, capsys, content, phrase):
    data = tmp_path / "data.json"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert train.main(argv(workspace, tmp_path / "out", data_path=data), stage=1) == 2
    err = capsys.readouterr().err
    assert phrase in err and str(data) in err and err.count("\n") == 1


def test_baseline_variant_trains_the_same_recipe_without_the_plugin(workspace, tmp_path):
    """`--methods none`: the papers' baseline row. Stage 1 trains the projector only and writes a plain checkpoint."""
    out = tmp_path / "baseline"
    assert train.main(argv(workspace, out, methods="none", max_steps=2, save_steps=2), stage=1) == 0
    assert (
        not (out / "normalign_config.json").exists() and not (out / "checkpoint-2" / "normalign_config.json").exists()
    )
    with normalign.autoload(False):
        trained = AutoModelForImageTextToText.from_pretrained(out)
    assert not normalign.is_patched(trained)
    before, after = plain_state(workspace / "tiny" / "model"), trained.state_dict()
    assert all(torch.equal(after[k], v) == (not k.startswith(PROJECTOR)) for k, v in before.items())


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        ({"methods": "none", "normalign_config": '{"moca": true}'}, "contradict"),
        ({"methods": "none", "push-to-hub": "me/x"}, "push_to_hub"),
    ],
)
def test_baseline_refuses_contradictions(workspace, tmp_path, capsys, options, phrase):
    assert train.main(argv(workspace, tmp_path / "out", **options), stage=1) == 2
    assert phrase in capsys.readouterr().err and not (tmp_path / "out").exists()


if __name__ == "__main__":
    # The launched side of _ddp_run: the stage-1 entry point, then whether it left the process group open.
    returncode = train.main(sys.argv[1:], stage=1)
    output_dir = sys.argv[sys.argv.index("--output_dir") + 1]
    with open(f"{output_dir}-rank{os.environ['RANK']}.json", "w") as f:
        json.dump({"returncode": returncode, "group_open": torch.distributed.is_initialized()}, f)
    raise SystemExit(returncode)
