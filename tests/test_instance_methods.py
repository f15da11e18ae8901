"""Issue 24: a patched model carries its own save_pretrained / push_to_hub (bound by patch, removed by unpatch);
transformers' class methods are not in a patched model's save path."""

import copy
import inspect
import os
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, PreTrainedModel

import hf_normalign as normalign
from hf_normalign import persistence
from hf_normalign.integrations import transformers as integration
from hf_normalign.modeling import get_base_model
from hf_normalign.testing import tiny_model

ALIGNED_FILES = {"config.json", "generation_config.json", "model.safetensors"} | {
    "normalign_config.json",
    "normalign.safetensors",
}
LORA = {"target_modules": r".*language_model.*\.(q_proj|v_proj)", "r": 4, "lora_alpha": 8}


def perturbed(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.normalign.parameters():
            param.add_(torch.randn(param.shape, generator=gen))
    return model


def snapshot(model):
    """Everything patch touches, by identity: the instance dict, the module tree and every module's hooks."""
    return (
        [(key, id(value)) for key, value in vars(model).items()],
        list(model._modules.items()),
        [(n, list(m._forward_hooks.items()), list(m._forward_pre_hooks.items())) for n, m in model.named_modules()],
    )


def test_patch_binds_save_and_push_and_unpatch_restores_vars_exactly():
    model = tiny_model("llava")
    before = snapshot(model)
    normalign.patch(model, methods=["projector_norm", "moca", "pre"])
    assert vars(model)["save_pretrained"].__self__ is model and vars(model)["push_to_hub"].__self__ is model
    normalign.unpatch(model)
    assert snapshot(model) == before
    assert "save_pretrained" not in vars(model) and "push_to_hub" not in vars(model)


def test_a_method_its_owner_set_on_the_instance_stays(tmp_path):
    model = tiny_model("llava")
    model.save_pretrained = own = lambda *args, **kwargs: "own"
    normalign.patch(model, methods="moca")
    assert model.save_pretrained is own and "push_to_hub" in vars(model)
    normalign.unpatch(model)
    assert vars(model)["save_pretrained"] is own and "push_to_hub" not in vars(model)


def _called_codes(fn):
    codes = set()
    sys.setprofile(lambda frame, event, arg: codes.add(frame.f_code) if event == "call" else None)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return codes


def test_a_patched_save_calls_transformers_own_save_and_no_class_wrapper(tmp_path):
    model = perturbed(normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca"]))
    transformers_save = inspect.getattr_static(PreTrainedModel, "save_pretrained").__wrapped__
    codes = _called_codes(lambda: model.save_pretrained(tmp_path / "aligned"))
    assert transformers_save.__code__ in codes
    assert integration.unpatched_save_guard.__code__ not in codes
    assert set(os.listdir(tmp_path / "aligned")) == ALIGNED_FILES
    # The base weights are exactly the unpatched model's (computed on a copy with the plugin removed).
    assert not any("normalign" in key for key in load_file(tmp_path / "aligned" / "model.safetensors"))
    base = normalign.unpatch(copy.deepcopy(model)).state_dict()
    with normalign.autoload(False):
        reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "aligned").state_dict()
    assert reloaded.keys() == base.keys() and all(torch.equal(reloaded[k], v) for k, v in base.items())
    plugin = load_file(tmp_path / "aligned" / "normalign.safetensors")
    assert plugin.keys() == model.normalign.state_dict().keys()
    assert all(torch.equal(plugin[k], v) for k, v in model.normalign.state_dict().items())

    # An unpatched model's save over that folder is the one that passes the guard, and drops the plugin files.
    plain = tiny_model("llava")
    codes = _called_codes(lambda: plain.save_pretrained(tmp_path / "aligned"))
    assert integration.unpatched_save_guard.__code__ in codes
    assert set(os.listdir(tmp_path / "aligned")) == {"config.json", "generation_config.json", "model.safetensors"}


def test_a_class_level_save_of_a_patched_model_still_writes_the_aligned_layout(tmp_path):
    model = normalign.patch(tiny_model("llava"), methods="moca")
    type(model).save_pretrained(model, tmp_path)
    assert set(os.listdir(tmp_path)) == ALIGNED_FILES


def test_a_deep_copy_saves_its_own_plugin(tmp_path):
    model = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca"])
    clone = perturbed(copy.deepcopy(model), seed=3)  # TRL's reference model is such a copy
    assert vars(clone)["save_pretrained"].__self__ is clone
    clone.save_pretrained(tmp_path / "clone")
    model.save_pretrained(tmp_path / "model")
    for saved, source in ((tmp_path / "clone", clone), (tmp_path / "model", model)):
        tensors = load_file(saved / "normalign.safetensors")
        assert all(torch.equal(tensors[k], v) for k, v in source.normalign.state_dict().items())
    original = load_file(tmp_path / "model" / "normalign.safetensors")
    assert not all(torch.equal(original[k], v) for k, v in clone.normalign.state_dict().items())
    normalign.unpatch(clone)
    assert "save_pretrained" not in vars(clone) and vars(model)["save_pretrained"].__self__ is model


def test_a_peft_model_around_a_patched_model(tmp_path):
    model = perturbed(normalign.patch(tiny_model("llava"), methods="moca"))
    peft_model = get_peft_model(model, LoraConfig(**LORA))
    assert "save_pretrained" not in vars(peft_model)  # PEFT's own save (the adapter) is left to PEFT
    assert vars(get_base_model(peft_model))["save_pretrained"].__self__ is model
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == ALIGNED_FILES
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.normalign.state_dict()[k], v) for k, v in merged.normalign.state_dict().items())

    # patch() of a PEFT model binds the methods on the transformers model inside it.
    wrapped = get_peft_model(tiny_model("llava"), LoraConfig(**LORA))
    normalign.patch(wrapped, methods="moca")
    assert "save_pretrained" in vars(get_base_model(wrapped)) and "save_pretrained" not in vars(wrapped)
    normalign.unpatch(wrapped)
    assert "save_pretrained" not in vars(get_base_model(wrapped))


def test_persistence_install_is_deprecated_and_changes_nothing():
    wrapper = inspect.getattr_static(PreTrainedModel, "from_pretrained")
    with pytest.warns(FutureWarning, match="integrations.transformers"):
        persistence.install()
    assert inspect.getattr_static(PreTrainedModel, "from_pretrained") is wrapper


def test_a_patched_model_pushes_the_aligned_files_and_the_card(monkeypatch):
    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    commits = []

    class RecordingApi(HfApi):
        def create_repo(self, repo_id, **kwargs):
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(self, repo_id, operations, **kwargs):
            commits.append({"repo_id": repo_id, "files": {op.path_in_repo for op in operations}, **kwargs})
            url = f"https://huggingface.co/{repo_id}/commit/{'0' * 40}"
            return CommitInfo(commit_url=url, commit_message="", commit_description="", oid="0" * 40)

    monkeypatch.setattr("hf_normalign.hub.HfApi", lambda token=None: RecordingApi(token="hf_test"))
    model = normalign.patch(tiny_model("llava"), methods="moca")
    model.push_to_hub("me/aligned", commit_message="first")
    (commit,) = commits
    assert commit["repo_id"] == "me/aligned" and commit["commit_message"] == "first"
    assert commit["files"] == ALIGNED_FILES | {"README.md"}
    with pytest.raises(TypeError):
        model.push_to_hub("me/aligned", not_an_option=1)  # transformers' signature
