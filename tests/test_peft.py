"""PEFT (LoRA / QLoRA) together with the hf-normalign plugin."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import hf_normalign as normalign
from hf_normalign.patching import get_plugin
from hf_normalign.peft_utils import mark_plugin_trainable, plugin_lora_exclude_modules
from hf_normalign.quantization import bnb_config, prepare_for_kbit_training
from hf_normalign.testing import tiny_batch, tiny_config, tiny_model

ALL_METHODS = ["projector_norm", "moca", "pre"]
# A regex: the list ["q_proj", "v_proj"] would also match the CLIP vision tower's q_proj / v_proj.
LORA = {"target_modules": r".*language_model.*\.(q_proj|v_proj)", "r": 4, "lora_alpha": 8}


def perturb(module, seed=1, scale=0.3):
    """Move parameters off their init (MoCa starts as the identity) so the plugin changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)


def patched_pair():
    """Two identical patched tiny LLaVAs with a perturbed plugin (the PRe head init draws from the global RNG)."""
    first = normalign.patch(tiny_model("llava"), methods=ALL_METHODS)
    perturb(get_plugin(first))
    second = normalign.patch(tiny_model("llava"), methods=ALL_METHODS)
    get_plugin(second).load_state_dict(get_plugin(first).state_dict())
    return first, second


def adam_steps(model, batch, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()


def test_lora_logits_match_a_manual_merge():
    model, reference = patched_pair()
    batch = tiny_batch(model)
    with torch.no_grad():
        patched_logits = reference(**batch).logits
        assert not torch.equal(patched_logits, tiny_model("llava")(**batch).logits)  # the plugin is active

    peft_model = get_peft_model(model, LoraConfig(**LORA))
    assert get_plugin(peft_model) is get_plugin(model) and normalign.is_patched(peft_model)
    with torch.no_grad():
        # LoRA B starts at zero: exactly the patched model
        assert torch.equal(peft_model(**batch).logits, patched_logits)

        # random B: the patched reference with W + scaling * B @ A merged by hand
        scaling = LORA["lora_alpha"] / LORA["r"]
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.normal_(0, 0.5)
                target = reference.get_submodule(name)
                delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
                target.weight.add_(scaling * delta)
        torch.testing.assert_close(peft_model(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)


def test_lora_training_step_trains_lora_and_plugin_only():
    model, reference = patched_pair()
    batch = tiny_batch(model)
    peft_model = mark_plugin_trainable(get_peft_model(model, LoraConfig(**LORA)))
    plugin = get_plugin(peft_model)
    plugin_ids = {id(p) for p in plugin.parameters()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in peft_model.named_parameters() if "lora_" in n or id(p) in plugin_ids}
    assert len(plugin_ids) == len(list(plugin.parameters())) and plugin_ids

    # At LoRA init the plugin gradients are those of the plain patched model.
    reference.train()
    reference(**batch).loss.backward()
    peft_model.train()
    peft_model(**batch).loss.backward()
    reference_plugin = dict(get_plugin(reference).named_parameters())
    for name, param in plugin.named_parameters():
        torch.testing.assert_close(param.grad, reference_plugin[name].grad, msg=name)
    peft_model.zero_grad()

    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    adam_steps(peft_model, batch, steps=2)  # two: lora_A has zero gradient while lora_B is zero
    for name, param in peft_model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), name


def test_modules_to_save_projector_copy_keeps_the_layernorm():
    model = normalign.patch(tiny_model("llava"), methods=["projector_norm"])
    perturb(get_plugin(model))
    config = LoraConfig(**LORA, modules_to_save=["multi_modal_projector"])
    peft_model = mark_plugin_trainable(get_peft_model(model, config))
    wrapper = peft_model.base_model.model.model.multi_modal_projector
    copy = wrapper.modules_to_save["default"]
    assert copy is not wrapper.original_module
    perturb(copy, seed=2, scale=0.05)  # the copy now differs from the original projector

    seen = {}
    copy.register_forward_hook(lambda m, a, out: seen.__setitem__("raw", out), prepend=True)  # before the LayerNorm
    peft_model.base_model.model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("embeds", kw["inputs_embeds"]), with_kwargs=True
    )
    batch = tiny_batch(model)
    peft_model.train()
    out = peft_model(**batch)
    norm = get_plugin(peft_model).projector_norm[0]
    expected = F.layer_norm(seen["raw"], norm.normalized_shape, eps=norm.eps) * norm.weight + norm.bias
    mask = batch["input_ids"] == model.config.image_token_id
    # once, with the original plugin's LayerNorm on the copy's output
    assert torch.equal(seen["embeds"][mask], expected.reshape(mask.sum(), -1))

    out.loss.backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in copy.parameters())
    assert all(p.grad is None for p in wrapper.original_module.parameters())


def test_unpatch_removes_hooks_from_peft_copies_of_the_projector():
    model = tiny_model("llava")
    batch = tiny_batch(model, with_labels=False)
    config = LoraConfig(**LORA, modules_to_save=["multi_modal_projector"])
    plain = get_peft_model(tiny_model("llava"), config)
    peft_model = get_peft_model(normalign.patch(model, methods=["projector_norm"]), config)
    normalign.unpatch(peft_model)
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, plain(**batch).logits)


def test_plugin_in_modules_to_save_is_refused():
    model = normalign.patch(tiny_model("llava"), methods=["projector_norm"])
    peft_model = get_peft_model(model, LoraConfig(**LORA, modules_to_save=["normalign"]))
    assert get_plugin(peft_model) is None  # the container is now a PEFT wrapper
    with pytest.raises(ValueError, match="modules_to_save"):
        mark_plugin_trainable(peft_model)


def test_all_linear_needs_the_plugin_excluded():
    model = normalign.patch(tiny_model("llava"), methods=ALL_METHODS)
    with pytest.raises(ValueError, match="exclude_modules"):
        mark_plugin_trainable(get_peft_model(model, LoraConfig(target_modules="all-linear")))

    model = normalign.patch(tiny_model("llava"), methods=ALL_METHODS)
    exclude = plugin_lora_exclude_modules(model)
    assert exclude == ["normalign.pre_head.fc1", "normalign.pre_head.fc2"]
    names = set(get_plugin(model).state_dict())
    peft_model = mark_plugin_trainable(
        get_peft_model(model, LoraConfig(target_modules="all-linear", exclude_modules=exclude))
    )
    assert set(get_plugin(peft_model).state_dict()) == names
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_patching_a_peft_model_matches_patching_first():
    first, reference = patched_pair()
    batch = tiny_batch(first)
    peft_model = get_peft_model(tiny_model("llava"), LoraConfig(**LORA))
    normalign.patch(peft_model, methods=ALL_METHODS)
    get_plugin(peft_model).load_state_dict(get_plugin(reference).state_dict())
    assert all(p.requires_grad for p in get_plugin(peft_model).parameters())  # added after PEFT froze the rest
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, reference(**batch).logits)


def test_save_and_reload_adapter_with_plugin(tmp_path):
    """PEFT saves the adapter, hf-normalign's adapter-only checkpoint the plugin; both in one directory."""
    model = normalign.patch(tiny_model("llava"), methods=ALL_METHODS)
    batch = tiny_batch(model)
    peft_model = mark_plugin_trainable(get_peft_model(model, LoraConfig(**LORA)))
    adam_steps(peft_model, batch, steps=2)
    with torch.no_grad():
        expected = peft_model(**batch).logits

    peft_model.save_pretrained(tmp_path)
    normalign.save_pretrained(peft_model, tmp_path, adapter_only=True, include=(), base_model_name_or_path="tiny")
    assert not any("normalign" in k for k in load_file(tmp_path / "adapter_model.safetensors"))

    def reload(with_plugin_weights: bool):
        base = tiny_model("llava")
        if with_plugin_weights:
            normalign.load_plugin_weights(base, tmp_path)  # patches with the saved config, loads strictly
        else:
            normalign.patch(base, methods=ALL_METHODS)
        return PeftModel.from_pretrained(base, tmp_path)

    with torch.no_grad():
        assert torch.equal(reload(True)(**batch).logits, expected)
        assert not torch.equal(reload(False)(**batch).logits, expected)  # PEFT alone does not carry the plugin


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_qlora_recipe(tmp_path):
    """The documented recipe: 4-bit load, patch, prepare, LoRA, plugin trainable; one step."""
    tiny_model("llava").save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(
        tmp_path, quantization_config=bnb_config(4, tiny_config("llava")), dtype=torch.bfloat16, device_map="cpu"
    )
    normalign.patch(model, methods=ALL_METHODS)
    model = prepare_for_kbit_training(model)
    peft_model = mark_plugin_trainable(get_peft_model(model, LoraConfig(**LORA)))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    plugin_names = {f"base_model.model.normalign.{n}" for n, _ in get_plugin(peft_model).named_parameters()}
    assert trainable == plugin_names | {n for n in trainable if "lora_" in n} and trainable - plugin_names

    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    adam_steps(peft_model, tiny_batch(peft_model), steps=2)
    for name, param in peft_model.named_parameters():
        assert (not torch.equal(param, before[name])) == (name in trainable), name
    assert all(p.dtype == torch.float32 for p in get_plugin(peft_model).parameters())
