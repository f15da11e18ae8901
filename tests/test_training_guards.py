"""No silent fallback in training: resuming without the plugin file, NormAlignCallback on a frozen plugin or an
unpatched model (HF Trainer here; TRL's SFTTrainer in tests/test_trl.py)."""

import copy
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import hf_normalign as normalign
from hf_normalign.integrations.transformers import RESUME_WITHOUT_PLUGIN_ENV
from hf_normalign.patching import get_plugin
from hf_normalign.testing import tiny_batch, tiny_model

METHODS = ["projector_norm", "moca"]


def trainer(model, out, *, steps: int, callbacks=None) -> Trainer:
    args = TrainingArguments(
        str(out), max_steps=steps, save_steps=1, learning_rate=0.1, report_to=[], use_cpu=True, save_only_model=True
    )
    batch = tiny_batch(model)
    data = [batch] * 4
    return Trainer(model, args, train_dataset=data, data_collator=lambda features: features[0], callbacks=callbacks)


def patched():
    torch.manual_seed(0)
    return normalign.patch(tiny_model("llava"), methods=METHODS)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(autouse=True)
def no_opt_out(monkeypatch):
    monkeypatch.delenv(RESUME_WITHOUT_PLUGIN_ENV, raising=False)


@pytest.fixture(scope="module")
def checkpoint_without_plugin(tmp_path_factory):
    """checkpoint-1 of a one-step run, with normalign.safetensors deleted."""
    out = tmp_path_factory.mktemp("run")
    model = patched()
    trainer(model, out, steps=1).train()
    ckpt = out / "checkpoint-1"
    os.remove(ckpt / "normalign.safetensors")
    return ckpt


def test_resume_from_a_checkpoint_without_the_plugin_file_is_refused(checkpoint_without_plugin, tmp_path):
    ckpt = checkpoint_without_plugin
    fresh = patched()
    before = state(fresh)
    run = trainer(fresh, tmp_path, steps=2)  # one step would be left to run
    with pytest.raises(normalign.NormAlignCheckpointError) as err:
        run.train(resume_from_checkpoint=str(ckpt))
    message = str(err.value)
    assert f"Cannot resume from {ckpt}" in message and "no normalign.safetensors" in message
    assert f"{RESUME_WITHOUT_PLUGIN_ENV}=1" in message
    assert run.state.global_step == 0 and not (tmp_path / "checkpoint-2").exists()  # nothing trained or saved
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # nothing loaded either


def test_resume_without_the_plugin_file_on_purpose_keeps_the_initial_plugin(
    checkpoint_without_plugin, tmp_path, monkeypatch
):
    ckpt = checkpoint_without_plugin
    monkeypatch.setenv(RESUME_WITHOUT_PLUGIN_ENV, "1")
    fresh = patched()
    initial_plugin = state(fresh.normalign)
    run = trainer(fresh, tmp_path, steps=1)
    run.train(resume_from_checkpoint=str(ckpt))  # no step left to run
    assert run.state.global_step == 1  # resumed from checkpoint-1's state, not restarted
    assert all(torch.equal(v, initial_plugin[k]) for k, v in fresh.normalign.state_dict().items())


def test_best_model_without_the_plugin_file_is_refused(checkpoint_without_plugin, tmp_path):
    ckpt = checkpoint_without_plugin
    run = trainer(patched(), tmp_path, steps=1)
    run.state.best_model_checkpoint = str(ckpt)
    with pytest.raises(normalign.NormAlignCheckpointError, match="Cannot load the best model from"):
        run._load_best_model()


def lora(model):
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_callback_refuses_a_peft_model_whose_plugin_peft_froze(tmp_path):
    model = lora(patched())
    assert not any(p.requires_grad for p in get_plugin(model).parameters())
    before = state(get_plugin(model))
    run = trainer(model, tmp_path, steps=1, callbacks=[normalign.NormAlignCallback()])
    with pytest.raises(ValueError) as err:
        run.train()
    message = str(err.value)
    total = len(list(get_plugin(model).parameters()))
    assert message.startswith(f"{total} of {total} hf-normalign plugin tensors are frozen")
    assert "mark_plugin_trainable" in message and "trl_kwargs" in message and "allow_frozen_plugin=True" in message
    assert run.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in get_plugin(model).state_dict().items())


def test_peft_model_with_the_plugin_marked_trainable_trains_saves_and_resumes_it(tmp_path):
    model = normalign.mark_plugin_trainable(lora(patched()))
    initial = state(get_plugin(model))
    trainer(model, tmp_path, steps=1, callbacks=[normalign.NormAlignCallback()]).train()
    trained = state(get_plugin(model))
    assert [k for k, v in trained.items() if torch.equal(v, initial[k])] == []  # every plugin tensor moved
    ckpt = tmp_path / "checkpoint-1"
    assert {"adapter_model.safetensors", "normalign.safetensors", "normalign_config.json"} <= set(os.listdir(ckpt))

    fresh = normalign.mark_plugin_trainable(lora(patched()))
    trainer(fresh, tmp_path / "again", steps=1).train(resume_from_checkpoint=str(ckpt))  # no step left
    assert all(torch.equal(v, trained[k]) for k, v in get_plugin(fresh).state_dict().items())


def test_a_plugin_frozen_on_purpose_is_allowed_and_stays_as_it_was(tmp_path):
    model = lora(patched())
    before = state(get_plugin(model))
    callback = normalign.NormAlignCallback(allow_frozen_plugin=True)
    trainer(model, tmp_path, steps=1, callbacks=[callback]).train()
    assert all(torch.equal(v, before[k]) for k, v in get_plugin(model).state_dict().items())


def test_callback_on_an_unpatched_model_is_refused(tmp_path):
    model = tiny_model("llava")
    before = copy.deepcopy(model.state_dict())
    run = trainer(model, tmp_path, steps=1, callbacks=[normalign.NormAlignCallback()])
    with pytest.raises(ValueError, match="not patched by hf-normalign.*hf_normalign.patch.*leave the callback out"):
        run.train()
    assert run.state.global_step == 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_callback_option_is_a_bool():
    with pytest.raises(TypeError, match="allow_frozen_plugin must be True or False"):
        normalign.NormAlignCallback(allow_frozen_plugin="no")
