"""TRL trainers on a tiny patched LLaVA (all three methods), with and without PEFT, via trl_kwargs."""

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")
pytest.importorskip("peft")

from datasets import Dataset
from peft import LoraConfig, PeftModel
from PIL import Image
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import hf_normalign as normalign
from hf_normalign.integrations.trl import trl_kwargs
from hf_normalign.patching import get_plugin
from hf_normalign.testing import TINY_FAMILIES, tiny_model, tiny_processor

METHODS = ["projector_norm", "moca", "pre"]
USER = [{"type": "image"}, {"type": "text", "text": "what is in the picture?"}]


def _image(i: int) -> Image.Image:
    return Image.new("RGB", (32, 32), (40 * i, 10, 200 - 30 * i))


def sft_data(n: int = 4) -> Dataset:
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": USER},
                    {"role": "assistant", "content": [{"type": "text", "text": f"a cat on a bench {i}."}]},
                ],
                "images": [_image(i)],
            }
            for i in range(n)
        ]
    )


def dpo_data(n: int = 4) -> Dataset:
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": USER}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"a cat on a bench {i}."}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"a dog {i}."}]}],
                "images": [_image(i)],
            }
            for i in range(n)
        ]
    )


TRAINERS = {"sft": (SFTTrainer, SFTConfig, sft_data), "dpo": (DPOTrainer, DPOConfig, dpo_data)}


def patched_model():
    torch.manual_seed(0)
    return normalign.patch(tiny_model("llava"), methods=METHODS)


class Recorder(TrainerCallback):
    """Plugin gradients just before the first optimizer step, and the policy forwards' inputs (grad enabled)."""

    def __init__(self, model):
        self.grads, self.forwards = None, []
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self.forwards.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            plugin = get_plugin(model)
            self.grads = {n: None if p.grad is None else p.grad.clone() for n, p in plugin.named_parameters()}


def train(kind, model, out, *, peft=False, steps=1, batch=2, accumulation=1, **config):
    trainer_cls, config_cls, data = TRAINERS[kind]
    args = config_cls(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_steps=1,
        logging_steps=1,
        learning_rate=1e-2,
        max_grad_norm=0.0,
        max_length=None,
        seed=0,
        **config,
    )
    kwargs = trl_kwargs(model, kind, peft_config=LoraConfig(target_modules="all-linear") if peft else None)
    recorder = Recorder(model)
    kwargs["callbacks"].append(recorder)
    trainer = trainer_cls(
        model=model, args=args, train_dataset=data(), processing_class=tiny_processor("llava"), **kwargs
    )
    trainer.train()
    return trainer, recorder


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_one_step_trains_every_plugin_parameter_and_checkpoint_reloads(kind, peft, tmp_path):
    model = patched_model()
    initial = copy.deepcopy(get_plugin(model).state_dict())
    start = copy.deepcopy(model)
    trainer, _ = train(kind, model, tmp_path, peft=peft)
    plugin = get_plugin(trainer.model)
    unchanged = [n for n, p in plugin.named_parameters() if torch.equal(p, initial[n])]
    assert unchanged == [] and all(p.requires_grad for p in plugin.parameters())

    ckpt = tmp_path / "checkpoint-1"
    final = tmp_path / "final"
    trainer.save_model(str(final))
    batch = {k: v for k, v in normalign.testing.tiny_batch("llava").items() if k != "labels"}
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(**batch).logits
    for folder in (ckpt, final):
        if peft:  # the base, its adapter, and the plugin files written beside the adapter
            reloaded = PeftModel.from_pretrained(copy.deepcopy(normalign.unpatch(copy.deepcopy(start))), str(folder))
            normalign.load_plugin_weights(reloaded, str(folder))
        else:
            reloaded = normalign.from_pretrained(str(folder))
        reloaded.eval()
        with torch.no_grad():
            assert torch.equal(reloaded(**batch).logits, want), folder


def _by_hand_pre_grad(start, forwards, weight, accumulation):
    """sum over the step's policy forwards of (weight / accumulation) * d(PRe)/d(head), in float64."""
    plugin = get_plugin(start)
    names = [f"pre_head.{n}" for n, _ in plugin.pre_head.named_parameters()]
    params = [p.detach().double().requires_grad_(True) for p in plugin.pre_head.parameters()]
    w1, b1, w2, b2 = params  # fc1.weight, fc1.bias, fc2.weight, fc2.bias
    layer = plugin.pre_run.layer
    total = None
    for kwargs in forwards:
        inputs = {k: kwargs[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in kwargs}
        # The layer's output as the next layer sees it (after MoCa; hidden_states[-1] would be after the final norm).
        seen = {}
        handle = start.model.language_model.layers[layer].register_forward_hook(
            lambda module, args, output, seen=seen: seen.setdefault("h", output)
        )
        with torch.no_grad():
            embeds = start(**inputs, output_hidden_states=True).hidden_states[0]
        handle.remove()
        mask = inputs["input_ids"] == start.config.image_token_id
        vision, anchor = seen["h"][mask].double(), embeds[mask].double()
        prediction = F.linear(F.gelu(F.linear(vision, w1, b1)), w2, b2)
        loss = (1 - F.cosine_similarity(prediction, anchor, dim=-1)).mean() * weight / accumulation
        grads = torch.autograd.grad(loss, params)
        total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
    return dict(zip(names, total, strict=True))


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_pre_head_gradient_is_weighted_pre_gradient_under_accumulation(kind, tmp_path):
    for accumulation, batch in ((1, 2), (2, 1)):
        model = patched_model()
        start = copy.deepcopy(model).train()
        _, recorder = train(kind, model, tmp_path / str(accumulation), batch=batch, accumulation=accumulation)
        weight = normalign.get_config(model).pre.weight
        expected = _by_hand_pre_grad(start, recorder.forwards[:accumulation], weight, accumulation)
        assert len(recorder.forwards) == accumulation  # one policy forward per micro-batch
        for name, grad in expected.items():
            torch.testing.assert_close(recorder.grads[name].double(), grad, rtol=1e-5, atol=1e-7)


def test_dpo_reference_is_frozen_initial_plugin_without_pre(tmp_path):
    model = patched_model()
    start = copy.deepcopy(model).eval()
    trainer, _ = train("dpo", model, tmp_path, steps=2)
    ref = trainer.ref_model
    assert normalign.get_config(ref).methods == ["projector_norm", "moca"]  # PRe changes no output: dropped
    assert not any(p.requires_grad for p in ref.parameters())
    batch = {k: v for k, v in normalign.testing.tiny_batch("llava").items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(ref(**batch).logits, start(**batch).logits)
        assert not torch.equal(trainer.model.eval()(**batch).logits, start(**batch).logits)


def test_dpo_lora_reference_pass_runs_initial_plugin(tmp_path):
    model = patched_model()
    start = copy.deepcopy(model).eval()
    trainer, _ = train("dpo", model, tmp_path, peft=True, steps=2)
    policy = trainer.model.train()
    plugin = get_plugin(policy)
    batch = normalign.testing.tiny_batch("llava")
    policy(**batch)
    policy_pre_loss = plugin.pre_run.last_loss
    trained = {n: p.detach().clone() for n, p in plugin.named_parameters()}
    with torch.no_grad(), policy.disable_adapter():
        ref_logits = policy(**batch).logits
    with torch.no_grad():
        assert torch.equal(ref_logits, start(**batch).logits)
    # Back to the trained plugin, and the policy's PRe loss is what the step logs.
    assert all(torch.equal(p, trained[n]) for n, p in plugin.named_parameters())
    assert plugin.pre_run.last_loss is policy_pre_loss
    assert not any(torch.equal(p, get_plugin(start).state_dict()[n]) for n, p in plugin.named_parameters())


def test_pre_loss_logged_once_per_step(tmp_path):
    trainer, _ = train("sft", patched_model(), tmp_path, steps=2)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all("pre_loss" in entry for entry in logged)


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="trainer must be one of"):
        trl_kwargs(patched_model(), "ppo")
    with pytest.raises(ValueError, match="patched by hf-normalign"):
        trl_kwargs(tiny_model("llava"), "sft")
    with pytest.raises(ValueError, match="regex"):
        trl_kwargs(patched_model(), "sft", peft_config=LoraConfig(target_modules="all-linear", exclude_modules="x.*"))


def test_sft_with_peft_config_and_the_plain_callback_stops_at_train_begin(tmp_path):
    """The set-up a reader of the Trainer section tries first: TRL's peft_config freezes the plugin, and the plain
    NormAlignCallback refuses it (naming trl_kwargs) instead of training 0 plugin tensors and saving none."""
    model = patched_model()
    before = copy.deepcopy(get_plugin(model).state_dict())
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, bf16=False, use_cpu=True,
        report_to=[], save_steps=1, max_length=None, learning_rate=1e-2,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=sft_data(), processing_class=tiny_processor("llava"),
        peft_config=LoraConfig(target_modules=["q_proj", "v_proj"]), callbacks=[normalign.NormAlignCallback()],
    )  # fmt: skip
    total = len(list(get_plugin(trainer.model).parameters()))
    with pytest.raises(ValueError, match=f"{total} of {total} hf-normalign plugin tensors are frozen.*trl_kwargs"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "checkpoint-1").exists()
    assert all(torch.equal(v, before[k]) for k, v in get_plugin(trainer.model).state_dict().items())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_processors_have_chat_template_and_save(family, tmp_path):
    try:
        processor = tiny_processor(family)
    except NotImplementedError:
        pytest.skip("processor needs an optional package")
    text = processor.apply_chat_template([{"role": "user", "content": USER}], add_generation_prompt=True)
    assert text.endswith("assistant:") and "what is in the picture?" in text
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template


def test_lora_resume_restores_the_plugin(tmp_path):
    full, _ = train("sft", patched_model(), tmp_path / "a", peft=True, steps=2)
    want = {n: p.detach().clone() for n, p in get_plugin(full.model).named_parameters()}
    model = patched_model()
    trainer_cls, config_cls, data = TRAINERS["sft"]
    args = config_cls(
        output_dir=str(tmp_path / "b"),
        max_steps=2,
        per_device_train_batch_size=2,
        bf16=False,
        use_cpu=True,
        report_to=[],
        learning_rate=1e-2,
        max_grad_norm=0.0,
        max_length=None,
        seed=0,
        save_strategy="no",
    )
    kwargs = trl_kwargs(model, "sft", peft_config=LoraConfig(target_modules="all-linear"))
    resumed = trainer_cls(
        model=model, args=args, train_dataset=data(), processing_class=tiny_processor("llava"), **kwargs
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    got = dict(get_plugin(resumed.model).named_parameters())
    for name, value in want.items():
        torch.testing.assert_close(got[name].detach(), value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_grpo_trains_plugin_and_reference_is_initial_plugin(peft, tmp_path):
    from transformers import AutoModelForImageTextToText
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    tiny_model("llava").save_pretrained(tmp_path / "base")  # a plain checkpoint: TRL reloads its reference from it
    model = normalign.patch(AutoModelForImageTextToText.from_pretrained(tmp_path / "base"), methods=METHODS)
    initial = copy.deepcopy(get_plugin(model).state_dict())
    start = copy.deepcopy(model).eval()
    prompt = [{"role": "user", "content": USER}]
    data = Dataset.from_list([{"prompt": prompt, "image": _image(i)} for i in range(4)])
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        bf16=False,
        use_cpu=True,
        report_to=[],
        learning_rate=1e-2,
        beta=0.1,
        seed=0,
    )
    kwargs = trl_kwargs(model, "grpo", peft_config=LoraConfig(target_modules="all-linear") if peft else None)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [float(len(str(c))) for c in completions],
        args=args,
        train_dataset=data,
        processing_class=tiny_processor("llava"),
        **kwargs,
    )
    trainer.train()
    plugin = get_plugin(trainer.model)
    assert not any(torch.equal(p, initial[n]) for n, p in plugin.named_parameters())
    assert trainer.state.log_history[0]["kl"] == 0.0  # the reference equals the policy before the first step
    batch = {k: v for k, v in normalign.testing.tiny_batch("llava").items() if k != "labels"}
    with torch.no_grad():
        if peft:
            with trainer.model.disable_adapter():
                ref_logits = trainer.model.eval()(**batch).logits
        else:
            assert normalign.get_config(trainer.ref_model).methods == ["projector_norm", "moca"]
            ref_logits = trainer.ref_model(**batch).logits
        assert torch.equal(ref_logits, start(**batch).logits)
