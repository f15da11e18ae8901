"""Issue: foundation. Projector LayerNorm + GWC, patch/unpatch, registry errors."""

import copy

import pytest
import torch
from conftest import ALL_FAMILIES, REQUIRED_FAMILIES
from helpers import capture_llm_inputs, embedding_norm_reference, grads, make_vision_loud, vision_mask

import hf_normalign as normalign
from hf_normalign.testing import tiny_batch, tiny_model


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_vision_norm_matches_text_scale_and_unpatch_restores(family):
    model = tiny_model(family)
    make_vision_loud(model)
    batch = tiny_batch(model)
    mask = vision_mask(model, batch["input_ids"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(**batch).logits
    before = capture_llm_inputs(model, batch)

    normalign.patch(model, methods="projector_norm")
    after = capture_llm_inputs(model, batch)
    target = embedding_norm_reference(model)
    rows = after[mask]
    if family in ("llava_next", "llava_onevision"):
        # The learned `image_newline` rows follow the projector and are not normalised.
        newline = model.model.image_newline.detach()
        rows = rows[~(rows == newline).all(-1)]
    assert rows.norm(dim=-1).mean().item() == pytest.approx(target, rel=0.05)
    assert before[mask].norm(dim=-1).mean().item() > 1.5 * target  # the fix changed something
    torch.testing.assert_close(after[~mask], before[~mask], rtol=0, atol=0)

    normalign.unpatch(model)
    assert not normalign.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], state[k]) for k in state)


@pytest.mark.parametrize("train", [True, False])
def test_gwc_scales_only_the_gradient_into_the_projector(train):
    batch = tiny_batch("llava")
    results = {}
    for gwc in (True, False):
        model = tiny_model("llava")
        # Hook first, so it sees the projector output before the LayerNorm.
        model.train(train)
        captured = {}

        def keep_grad(module, args, output, captured=captured):
            output.register_hook(lambda g: captured.update(grad=g.clone()))

        model.model.multi_modal_projector.register_forward_hook(keep_grad)
        normalign.patch(model, projector_norm=normalign.ProjectorNormConfig(gwc=gwc))
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        results[gwc] = (out.logits.detach(), captured["grad"], grads(model.normalign), model)
    (logits_on, grad_on, plugin_on, model_on), (logits_off, grad_off, plugin_off, _) = (
        results[True],
        results[False],
    )
    assert torch.equal(logits_on, logits_off)
    for name in plugin_on:  # gain and bias gradients untouched
        torch.testing.assert_close(plugin_on[name], plugin_off[name], rtol=1e-6, atol=0)
    gain = model_on.normalign.projector_norm[0].weight.detach().double()
    factor = 1.0 / max(gain.abs().mean().item(), 1e-3) if train else 1.0
    assert factor > 10 or not train
    # LayerNorm backward subtracts means: compare at the scale of the gradient, not per element.
    torch.testing.assert_close(grad_on, grad_off * factor, rtol=1e-4, atol=1e-5 * grad_on.abs().max().item())


def test_adamw_step_changes_gain_and_checkpointing_gives_same_gradients():
    batch = tiny_batch("llava")
    runs = []
    for checkpointing in (False, True):
        model = tiny_model("llava")
        normalign.patch(model, methods="projector_norm")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**batch).loss.backward()
        runs.append((model, grads(model)))
    (model, g0), (_, g1) = runs
    assert g0.keys() == g1.keys() and "normalign.projector_norm.0.weight" in g0
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-5, atol=1e-7)
    gain = model.normalign.projector_norm[0].weight
    before = gain.detach().clone()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert not torch.equal(gain.detach(), before)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_generate_with_kv_cache_on_patched_family(family):
    model = tiny_model(family)
    batch = tiny_batch(model, batch_size=1, with_labels=False)
    normalign.patch(model, methods="projector_norm")
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4


def test_deepcopy_gets_its_own_plugin():
    model = normalign.patch(tiny_model("llava"), methods="projector_norm")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.normalign.projector_norm[0].weight.mul_(3)
    batch = tiny_batch(model, with_labels=False)
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, twin(**batch).logits)
        twin.normalign.projector_norm[0].weight.div_(3)
        assert torch.equal(model(**batch).logits, twin(**batch).logits)


def test_target_norm_override():
    model = normalign.patch(tiny_model("llava"), projector_norm=normalign.ProjectorNormConfig(target_norm=2.0))
    gain = model.normalign.projector_norm[0].weight
    torch.testing.assert_close(gain, torch.full_like(gain, 2.0 / gain.numel() ** 0.5))


def test_qwen3_deepstack_option():
    on = normalign.patch(tiny_model("qwen3_vl"), methods="projector_norm")
    off = normalign.patch(tiny_model("qwen3_vl"), projector_norm=normalign.ProjectorNormConfig(deepstack=False))
    n_deepstack = len(on.model.visual.deepstack_merger_list)
    assert len(on.normalign.projector_norm) == 1 + n_deepstack
    assert len(off.normalign.projector_norm) == 1


def test_same_config_is_noop_and_different_config_raises():
    model = normalign.patch(tiny_model("llava"), methods="projector_norm")
    assert normalign.patch(model, methods="projector_norm") is model
    with pytest.raises(ValueError, match="already patched.*unpatch"):
        normalign.patch(model, methods=["projector_norm", "moca"])


def test_errors_name_problem_and_fix():
    with pytest.raises(ValueError, match="Unknown method.*projector_norm"):
        normalign.patch(tiny_model("llava"), methods="layernorm")
    with pytest.raises(ValueError, match="Nothing to patch"):
        normalign.patch(tiny_model("llava"))
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    )
    with pytest.raises(ValueError, match="text-only"):
        normalign.patch(text_only, methods="projector_norm")
    model = tiny_model("llava")
    model.config.model_type = "my_new_vlm"
    with pytest.raises(ValueError, match="Unsupported architecture.*llava.*register_architecture"):
        normalign.patch(model, methods="projector_norm")
    with pytest.raises(ValueError, match="not patched"):
        normalign.unpatch(tiny_model("llava"))


def test_register_architecture_for_a_new_family():
    model = tiny_model("llava")
    model.config.model_type = "my_llava_like"
    spec = normalign.ArchitectureSpec(
        model_type="my_llava_like",
        projector="model.multi_modal_projector",
        language_model="model.language_model",
        vision_tower="model.vision_tower",
    )
    normalign.register_architecture(spec)
    try:
        assert "my_llava_like" in normalign.supported_architectures()
        normalign.patch(model, methods="projector_norm")
        assert normalign.get_config(model).methods == ["projector_norm"]
    finally:
        normalign.unregister_architecture("my_llava_like")  # later tests see the shipped registry
