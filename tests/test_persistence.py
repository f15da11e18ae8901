"""Issue: persistence. Aligned checkpoints: save, every load path, adapter form, atomic writes, errors."""

import inspect
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
import safetensors.torch
import torch
import transformers
import wrapt
from conftest import REQUIRED_FAMILIES
from transformers import AutoModel, AutoModelForImageTextToText, BitsAndBytesConfig, PreTrainedModel

import hf_normalign as normalign
from hf_normalign import cli, persistence
from hf_normalign.persistence import save as persistence_save
from hf_normalign.persistence.format import file_sha256
from hf_normalign.testing import tiny_batch, tiny_model

COMBOS = (("projector_norm",), ("moca",), ("pre",), ("projector_norm", "moca", "pre"))
ALIGNED_FILES = {"config.json", "generation_config.json", "model.safetensors"} | {
    "normalign_config.json",
    "normalign.safetensors",
}
ADAPTER_FILES = {"normalign_config.json", "normalign.safetensors", "normalign_modules.safetensors"}


def train_one_step(model, params=None) -> None:
    """Forward with labels in train mode, backward, one SGD step: plugin weights move away from their init."""
    model.train()
    model(**tiny_batch(model, seed=1)).loss.backward()
    params = [p for p in (params or model.parameters()) if p.grad is not None]
    torch.optim.SGD(params, lr=0.5).step()
    model.zero_grad(set_to_none=True)
    model.eval()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def aligned(family: str, methods=COMBOS[-1], **text_overrides):
    model = normalign.patch(tiny_model(family, **text_overrides), methods=list(methods))
    train_one_step(model)
    return model


@pytest.fixture
def no_pickle(monkeypatch):
    """Any pickle read during the test fails it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)


def assert_same(loaded, model, batch, reference) -> None:
    assert normalign.is_patched(loaded)
    assert normalign.get_config(loaded) == normalign.get_config(model)
    assert all(p.dtype == torch.float32 for p in loaded.normalign.parameters())
    state = loaded.normalign.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.normalign.state_dict().items())  # PRe's head too
    assert torch.equal(logits(loaded, batch), reference)


LOADERS = {
    "normalign.from_pretrained": lambda path, cls: normalign.from_pretrained(path),
    "AutoNormAlign": lambda path, cls: normalign.AutoNormAlignModelForImageTextToText.from_pretrained(path),
    "AutoModelForImageTextToText": lambda path, cls: AutoModelForImageTextToText.from_pretrained(path),
    "family class": lambda path, cls: cls.from_pretrained(path),
}


@pytest.mark.parametrize("methods", COMBOS, ids="+".join)
@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_round_trip_through_every_load_path(family, methods, tmp_path, no_pickle):
    model = aligned(family, methods)
    batch = tiny_batch(model, with_labels=False)
    reference = logits(model, batch)

    model.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == ALIGNED_FILES  # safetensors and JSON only: no pickle written
    assert not any(k.startswith("normalign.") for k in safetensors.torch.load_file(tmp_path / "model.safetensors"))
    saved = safetensors.torch.load_file(tmp_path / "normalign.safetensors")
    assert saved.keys() == model.normalign.state_dict().keys()  # plugin-local names
    for name, load in LOADERS.items():
        loaded = load(tmp_path, type(model))
        assert type(loaded) is type(model), name
        assert_same(loaded, model, batch, reference)


@pytest.mark.parametrize("methods", COMBOS, ids="+".join)
@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_adapter_only_round_trip(family, methods, tmp_path, no_pickle):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model(family).save_pretrained(base_dir)
    model = normalign.patch(AutoModelForImageTextToText.from_pretrained(base_dir), methods=list(methods))
    projector = model.get_submodule(model.normalign.spec.projector)
    before = {k: v.clone() for k, v in projector.state_dict().items()}
    # Stage 1: the plugin and the projector train, the rest is frozen.
    train_one_step(model, params=[*model.normalign.parameters(), *projector.parameters()])
    assert any(not torch.equal(before[k], v) for k, v in projector.state_dict().items())
    batch = tiny_batch(model, with_labels=False)
    reference = logits(model, batch)

    normalign.save_pretrained(model, adapter_dir, adapter_only=True)
    assert set(os.listdir(adapter_dir)) == ADAPTER_FILES
    info = normalign.read_checkpoint_info(adapter_dir)
    assert info.adapter_only and info.base_model_name_or_path == str(base_dir)
    assert info.modules_to_save[0] == model.normalign.spec.projector
    for load in LOADERS.values():
        assert_same(load(adapter_dir, type(model)), model, batch, reference)
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    assert normalign.from_pretrained(adapter_dir, base_model=base) is base
    assert_same(base, model, batch, reference)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_base_files_are_exactly_what_transformers_writes(family, tmp_path):
    model = normalign.patch(tiny_model(family), methods=list(COMBOS[-1]))
    model.save_pretrained(tmp_path / "aligned")
    normalign.unpatch(model).save_pretrained(tmp_path / "vanilla")
    assert sorted(os.listdir(tmp_path / "vanilla")) == sorted(
        ALIGNED_FILES - {"normalign_config.json"} - {"normalign.safetensors"}
    )
    for name in os.listdir(tmp_path / "vanilla"):
        assert (tmp_path / "aligned" / name).read_bytes() == (tmp_path / "vanilla" / name).read_bytes(), name


def test_config_file_records_methods_versions_and_base(tmp_path):
    config = normalign.NormAlignConfig(
        projector_norm=normalign.ProjectorNormConfig(gwc=False), moca=normalign.MoCaConfig(layers=[1])
    )
    normalign.patch(tiny_model("qwen2_vl"), config).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "normalign_config.json").read_text())
    assert data["format_version"] == persistence.FORMAT_VERSION
    assert data["library_version"] == normalign.__version__
    assert data["methods"] == config.to_dict()
    assert (data["base_model_type"], data["base_model_class"]) == ("qwen2_vl", "Qwen2VLForConditionalGeneration")
    assert (data["hidden_size"], data["num_decoder_layers"], data["adapter_only"]) == (64, 2, False)
    assert normalign.get_config(normalign.from_pretrained(tmp_path)) == config


def test_trainer_style_state_dict_is_split(tmp_path):
    model = aligned("llava")
    batch = tiny_batch(model, with_labels=False)
    model.save_pretrained(tmp_path, state_dict=model.state_dict())
    assert not any(k.startswith("normalign.") for k in safetensors.torch.load_file(tmp_path / "model.safetensors"))
    assert torch.equal(logits(normalign.from_pretrained(tmp_path), batch), logits(model, batch))


def test_offline_hub_cache_layout(tmp_path, monkeypatch):
    """A repo id resolves from a snapshot in HF_HOME with HF_HUB_OFFLINE=1, as after a download."""
    hf_home = tmp_path / "hf_home"
    commit = "0123456789abcdef0123456789abcdef01234567"

    def cached_repo(repo_id: str):
        repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        return repo / "snapshots" / commit

    model = aligned("llava")
    batch = tiny_batch(model, with_labels=False)
    reference = logits(model, batch)
    model.save_pretrained(cached_repo("org/aligned"))
    tiny_model("llava").save_pretrained(cached_repo("org/base"))
    adapter = normalign.patch(tiny_model("llava"), methods=["moca"])
    train_one_step(adapter, params=[*adapter.normalign.parameters(), *adapter.model.multi_modal_projector.parameters()])
    normalign.save_pretrained(
        adapter, cached_repo("org/adapter"), adapter_only=True, base_model_name_or_path="org/base"
    )

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both at import; the test process imported it long ago.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    assert_same(normalign.from_pretrained("org/aligned"), model, batch, reference)
    assert_same(AutoModelForImageTextToText.from_pretrained("org/aligned"), model, batch, reference)
    assert_same(transformers.LlavaForConditionalGeneration.from_pretrained("org/aligned"), model, batch, reference)
    loaded = normalign.from_pretrained("org/adapter")
    assert loaded.name_or_path == "org/base"
    assert_same(loaded, adapter, batch, logits(adapter, batch))
    with pytest.raises(OSError):  # the cache is really what is read: an unknown repo fails offline
        normalign.from_pretrained("org/missing")


# --- atomic writes ---------------------------------------------------------------------------------------------


def _fail_transformers_write(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fail)


def _fail_plugin_write(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(persistence_save, "save_file", fail)


def _fail_commit(monkeypatch, tmp_path):
    replace = os.replace

    def fail_commit_marker(src, dst):
        if os.fspath(dst).endswith(persistence.COMMIT_NAME):
            raise OSError("rename failed (injected)")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_commit_marker)


@pytest.mark.parametrize("inject", [_fail_transformers_write, _fail_plugin_write, _fail_commit])
def test_failure_mid_save_keeps_previous_checkpoint(inject, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    model = aligned("llava")
    batch = tiny_batch(model, with_labels=False)
    before = logits(model, batch)
    model.save_pretrained(target)
    (target / "preprocessor_config.json").write_text("{}")  # saved separately, e.g. by a processor
    train_one_step(model)
    assert not torch.equal(logits(model, batch), before)

    with monkeypatch.context() as patched:
        inject(patched, tmp_path)
        with pytest.raises((OSError, RuntimeError)):
            model.save_pretrained(target)

    # no staging or backup directory left behind; the writer lock's (empty) file stays beside the folder
    assert sorted(os.listdir(tmp_path)) == [".ckpt.normalign-lock", "ckpt"]
    assert set(os.listdir(target)) == ALIGNED_FILES | {"preprocessor_config.json"}
    assert torch.equal(logits(normalign.from_pretrained(target), batch), before)
    model.save_pretrained(target)  # and a retry goes through, keeping the processor file
    assert set(os.listdir(target)) == ALIGNED_FILES | {"preprocessor_config.json"}
    assert torch.equal(logits(normalign.from_pretrained(target), batch), logits(model, batch))


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    _fail_plugin_write(monkeypatch, tmp_path)
    with pytest.raises(OSError):
        aligned("llava").save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path) == [".new.normalign-lock"]  # the writer lock's empty file only


def test_saving_into_the_working_directory(tmp_path, monkeypatch):
    """The directory is replaced by a rename; a process whose cwd it was must land in the new one."""
    target = tmp_path / "ckpt"
    target.mkdir()
    monkeypatch.chdir(target)
    model = aligned("llava")
    model.save_pretrained(".")
    model.save_pretrained(".")
    assert os.path.samefile(os.getcwd(), target)
    assert set(os.listdir(".")) == ALIGNED_FILES


def test_unpatched_save_over_aligned_checkpoint_drops_stale_plugin_files(tmp_path):
    model = aligned("llava", ("moca",))
    model.save_pretrained(tmp_path)
    normalign.unpatch(model).save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == {"config.json", "generation_config.json", "model.safetensors"}
    assert not normalign.is_patched(AutoModelForImageTextToText.from_pretrained(tmp_path))


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An aligned llava checkpoint (all methods) to corrupt in each test."""
    path = tmp_path_factory.mktemp("aligned")
    aligned("llava").save_pretrained(path)
    return path


@pytest.fixture
def ckpt(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _rehash(path) -> None:
    """Record the current weights' SHA-256, as if the edited file came from a save (tests of later checks)."""
    _edit_config(
        path,
        lambda d: d.update(sha256={"normalign.safetensors": file_sha256(str(path / "normalign.safetensors"))}),
    )


def _edit_weights(path, edit) -> None:
    tensors = safetensors.torch.load_file(path / "normalign.safetensors")
    edit(tensors)
    safetensors.torch.save_file(tensors, path / "normalign.safetensors")
    _rehash(path)


def _edit_config(path, edit) -> None:
    data = json.loads((path / "normalign_config.json").read_text())
    edit(data)
    (path / "normalign_config.json").write_text(json.dumps(data))


LOAD_PATHS = [normalign.from_pretrained, AutoModelForImageTextToText.from_pretrained]


@pytest.mark.parametrize("load", LOAD_PATHS, ids=["normalign", "transformers"])
def test_missing_plugin_key(ckpt, load):
    _edit_weights(ckpt, lambda t: t.pop("moca.layer_1_norm.scale"))
    with pytest.raises(
        normalign.NormAlignCheckpointError,
        match=r"normalign\.safetensors.*missing keys \['moca\.layer_1_norm\.scale'\]",
    ):
        load(ckpt)


def test_unexpected_plugin_key(ckpt):
    _edit_weights(ckpt, lambda t: t.update({"moca.layer_7_norm.scale": torch.ones(64)}))
    with pytest.raises(normalign.NormAlignCheckpointError, match=r"unexpected keys \['moca\.layer_7_norm\.scale'\]"):
        normalign.from_pretrained(ckpt)


def test_shape_mismatch_from_a_different_hidden_size(ckpt, tmp_path):
    aligned("llava", hidden_size=128).save_pretrained(tmp_path / "wide")
    shutil.copy(tmp_path / "wide" / "normalign.safetensors", ckpt / "normalign.safetensors")
    _rehash(ckpt)
    with pytest.raises(normalign.NormAlignCheckpointError) as err:
        normalign.from_pretrained(ckpt)
    message = str(err.value)
    assert "normalign.safetensors" in message and "another size" in message
    assert "projector_norm.0.weight" in message and "hidden size 64" in message


@pytest.mark.parametrize(("version", "pattern"), [(99, r"format 99.*Upgrade"), ("1", "unknown format_version")])
def test_unknown_format_version(ckpt, version, pattern):
    _edit_config(ckpt, lambda d: d.update(format_version=version))
    with pytest.raises(normalign.NormAlignCheckpointError, match=rf"normalign_config\.json.*{pattern}"):
        normalign.from_pretrained(ckpt)
    with pytest.raises(normalign.NormAlignCheckpointError, match=pattern):
        AutoModelForImageTextToText.from_pretrained(ckpt)


def test_config_and_weights_disagree(ckpt):
    _edit_config(ckpt, lambda d: d["methods"]["moca"].update(layers=[0]))
    with pytest.raises(normalign.NormAlignCheckpointError) as err:
        normalign.from_pretrained(ckpt)
    message = str(err.value)
    assert "normalign.safetensors does not match" in message and "different saves" in message
    assert "unexpected keys ['moca.layer_1_norm.scale', 'moca.layer_1_norm.shift']" in message


def test_config_settings_that_do_not_fit_the_model(ckpt):
    _edit_config(ckpt, lambda d: d["methods"]["moca"].update(layers=[5]))
    with pytest.raises(
        normalign.NormAlignCheckpointError, match=r"normalign_config\.json settings cannot be applied.*\[5\]"
    ):
        normalign.from_pretrained(ckpt)


def test_missing_weights_file(ckpt):
    os.remove(ckpt / "normalign.safetensors")
    with pytest.raises(normalign.NormAlignCheckpointError, match=r"normalign\.safetensors could not be resolved"):
        normalign.from_pretrained(ckpt)


def test_plain_checkpoint_is_not_an_aligned_one(tmp_path):
    tiny_model("llava").save_pretrained(tmp_path)
    with pytest.raises(normalign.NormAlignCheckpointError, match="holds no normalign_config.json"):
        normalign.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="normalign_config="):
        normalign.AutoNormAlignModelForImageTextToText.from_pretrained(tmp_path)


def test_auto_class_patches_a_plain_checkpoint_on_load(tmp_path):
    tiny_model("llava").save_pretrained(tmp_path)
    config = normalign.NormAlignConfig(moca=normalign.MoCaConfig(layers=[0]))
    model = normalign.AutoNormAlignModelForImageTextToText.from_pretrained(tmp_path, normalign_config=config)
    assert normalign.get_config(model) == config
    model = normalign.AutoNormAlignModelForImageTextToText.from_pretrained(tmp_path, normalign_config="pre")
    assert normalign.get_config(model).methods == ["pre"]
    model.save_pretrained(tmp_path / "aligned")
    with pytest.raises(ValueError, match="already an aligned checkpoint"):
        normalign.AutoNormAlignModelForImageTextToText.from_pretrained(tmp_path / "aligned", normalign_config="moca")


def test_adapter_on_a_base_that_does_not_match(tmp_path):
    adapter = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca"])
    normalign.save_pretrained(adapter, tmp_path, adapter_only=True, base_model_name_or_path="org/llava-base")
    for other, found in [
        (tiny_model("qwen2_vl"), "model_type 'qwen2_vl'"),
        (tiny_model("llava", hidden_size=128), "hidden size 128"),
    ]:
        with pytest.raises(normalign.NormAlignCheckpointError) as err:
            normalign.from_pretrained(tmp_path, base_model=other)
        message = str(err.value)
        assert str(tmp_path) in message and "'org/llava-base'" in message and found in message
        assert "base_model=" in message
        assert not normalign.is_patched(other)  # a failed load leaves the caller's model as it was


def test_adapter_module_weights_must_fit(tmp_path):
    adapter = normalign.patch(tiny_model("llava"), methods=["moca"])
    normalign.save_pretrained(adapter, tmp_path, adapter_only=True, base_model_name_or_path="org/base")
    tensors = safetensors.torch.load_file(tmp_path / "normalign_modules.safetensors")
    tensors["model.multi_modal_projector.extra.weight"] = torch.zeros(1)
    safetensors.torch.save_file(tensors, tmp_path / "normalign_modules.safetensors")
    digest = file_sha256(str(tmp_path / "normalign_modules.safetensors"))  # past the integrity check
    _edit_config(tmp_path, lambda d: d["sha256"].update({"normalign_modules.safetensors": digest}))
    base = tiny_model("llava")
    with pytest.raises(
        normalign.NormAlignCheckpointError, match=r"normalign_modules\.safetensors.*unexpected keys \['extra\.weight'\]"
    ):
        normalign.from_pretrained(tmp_path, base_model=base)
    assert not normalign.is_patched(base)


def test_loading_into_a_class_that_cannot_be_patched(saved):
    with pytest.raises(normalign.NormAlignCheckpointError, match=r"LlavaModel.*autoload\(False\)"):
        AutoModel.from_pretrained(saved)
    with normalign.autoload(False):
        assert type(AutoModel.from_pretrained(saved)).__name__ == "LlavaModel"


# --- load-time patching switch, plain transformers ---------------------------------------------------------------


def test_autoload_switches(saved, monkeypatch):
    assert normalign.is_patched(AutoModelForImageTextToText.from_pretrained(saved))
    with normalign.autoload(False):
        assert not normalign.is_patched(AutoModelForImageTextToText.from_pretrained(saved))
        assert normalign.is_patched(normalign.from_pretrained(saved))  # the explicit loader always patches
    assert normalign.is_patched(transformers.LlavaForConditionalGeneration.from_pretrained(saved))
    normalign.autoload(False)
    try:
        assert not normalign.is_patched(AutoModelForImageTextToText.from_pretrained(saved))
    finally:
        normalign.autoload(True)
    monkeypatch.setenv("HF_NORMALIGN_AUTOLOAD", "0")
    assert not normalign.is_patched(transformers.LlavaForConditionalGeneration.from_pretrained(saved))


_PLAIN_TRANSFORMERS = textwrap.dedent(
    """
    import sys, safetensors.torch, torch
    from transformers import AutoModelForImageTextToText
    ckpt, batch_file, out = sys.argv[1:]
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    with torch.no_grad():
        logits = model(**safetensors.torch.load_file(batch_file)).logits
    assert "hf_normalign" not in sys.modules
    assert not any("normalign" in name for name, _ in model.named_modules())
    safetensors.torch.save_file({"logits": logits}, out)
    """
)


def test_plain_transformers_loads_the_base_without_the_intervention(tmp_path):
    model = aligned("llava")
    batch = tiny_batch(model, with_labels=False)
    patched = logits(model, batch)
    model.save_pretrained(tmp_path / "ckpt")
    safetensors.torch.save_file(batch, tmp_path / "batch.safetensors")
    subprocess.run(
        [
            sys.executable,
            "-c",
            _PLAIN_TRANSFORMERS,
            tmp_path / "ckpt",
            tmp_path / "batch.safetensors",
            tmp_path / "out",
        ],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    plain = safetensors.torch.load_file(tmp_path / "out")["logits"]
    assert torch.equal(plain, logits(normalign.unpatch(model), batch))  # exactly the trained base model
    assert not torch.allclose(plain, patched)


def test_trainer_checkpoints_resume_with_the_plugin(tmp_path):
    """Trainer checkpoints are aligned checkpoints; resuming restores the plugin from normalign.safetensors."""
    from transformers import Trainer, TrainingArguments

    def trainer(model, steps):
        args = TrainingArguments(
            tmp_path, max_steps=steps, save_steps=1, learning_rate=0.1, report_to=[], use_cpu=True, save_only_model=True
        )
        batch = tiny_batch(model)
        return Trainer(model, args, train_dataset=[batch] * 4, data_collator=lambda features: features[0])

    model = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca"])
    trainer(model, steps=1).train()
    assert set(os.listdir(tmp_path / "checkpoint-1")) >= ALIGNED_FILES
    trained = {k: v.clone() for k, v in model.normalign.state_dict().items()}

    fresh = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca"])
    trainer(fresh, steps=1).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))  # no step left to run
    state = fresh.normalign.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())


# --- quantised loading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_load_keeps_plugin_fp32(saved, bits, tmp_path):
    skip = ["lm_head", "model.multi_modal_projector"]
    quant = BitsAndBytesConfig(**{f"load_in_{bits}bit": True}, llm_int8_skip_modules=skip)
    for model in (
        normalign.from_pretrained(saved, quantization_config=quant, dtype=torch.bfloat16),
        AutoModelForImageTextToText.from_pretrained(saved, quantization_config=quant, dtype=torch.bfloat16),
    ):
        assert type(model.model.language_model.layers[0].mlp.up_proj).__name__ in ("Linear4bit", "Linear8bitLt")
        assert model.model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16
        assert {p.dtype for p in model.normalign.parameters()} == {torch.float32}
        assert logits(model, tiny_batch(model, with_labels=False)).isfinite().all()

    adapter = normalign.patch(tiny_model("llava"), methods=["moca"])
    normalign.save_pretrained(adapter, tmp_path, adapter_only=True, base_model_name_or_path=str(saved))
    # The adapter carries projector weights: a quantised projector cannot take them.
    with pytest.raises(normalign.NormAlignCheckpointError, match="llm_int8_skip_modules"):
        normalign.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**{f"load_in_{bits}bit": True}))
    model = normalign.from_pretrained(tmp_path, quantization_config=quant)
    assert {p.dtype for p in model.normalign.parameters()} == {torch.float32}


# --- installation and command line -------------------------------------------------------------------------------


def test_import_installs_the_wrappers_once():
    from hf_normalign.integrations import transformers as integration

    for owner, name in [
        (PreTrainedModel, "save_pretrained"),  # the guard for unpatched models only
        (PreTrainedModel, "from_pretrained"),
        (AutoModelForImageTextToText, "from_pretrained"),
    ]:
        wrapper = inspect.getattr_static(owner, name)
        assert isinstance(wrapper, wrapt.FunctionWrapper) and wrapper._self_wrapper._hf_normalign, (owner, name)
        integration.install()
        assert inspect.getattr_static(owner, name) is wrapper  # idempotent
    # A patched model pushes through its own method (tests/test_instance_methods.py): the class is not wrapped.
    assert not isinstance(inspect.getattr_static(PreTrainedModel, "push_to_hub"), wrapt.FunctionWrapper)


def test_cli_patch(tmp_path, capsys):
    tiny_model("llava").save_pretrained(tmp_path / "base")
    out = tmp_path / "aligned"
    assert cli.main(["patch", str(tmp_path / "base"), "--methods", "projector_norm,moca", "--out", str(out)]) == 0
    assert normalign.get_config(AutoModelForImageTextToText.from_pretrained(out)).methods == ["projector_norm", "moca"]
    assert set(os.listdir(out)) >= ALIGNED_FILES

    (tmp_path / "cfg.json").write_text(json.dumps({"moca": {"layers": [1]}}))
    adapter = tmp_path / "adapter"
    argv = ["patch", str(tmp_path / "base"), "--config", str(tmp_path / "cfg.json"), "--out", str(adapter)]
    assert cli.main([*argv, "--adapter-only"]) == 0
    assert set(os.listdir(adapter)) == ADAPTER_FILES
    assert normalign.get_config(normalign.from_pretrained(adapter)).moca.layers == [1]

    for argv, phrase in [
        ([], "one of the arguments --methods --config is required"),
        (["--methods", "nope"], "Unknown method"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["patch", str(tmp_path / "base"), "--out", str(tmp_path / "x"), *argv])
        assert exit_.value.code == 2 and phrase in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
