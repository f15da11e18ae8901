"""Issue: a patched model keeps transformers' model contract (loading info, tuples, compile, static caches,
attention implementations, batching, resizing, threads, mixed precision). Every expectation comes from the
unpatched model, an eager run, or a computation by hand."""

import copy
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from helpers import grads, make_vision_loud
from transformers import AutoModelForImageTextToText, CompileConfig, LlavaForConditionalGeneration

import hf_normalign as normalign
from hf_normalign.registry import get_spec
from hf_normalign.testing import TINY_FAMILIES, tiny_batch, tiny_model

ALL_METHODS = ["projector_norm", "moca", "pre"]


def patched(family="llava", *, init_std=0.3, loud=True, **model_kwargs):
    """A tiny model with all three methods and a non-identity MoCa, so the plugin changes every output."""
    model = tiny_model(family, **model_kwargs)
    if loud:  # a hook of the test's own, not saved with the model
        make_vision_loud(model)
    return normalign.patch(model, methods=ALL_METHODS, moca=normalign.MoCaConfig(init_std=init_std))


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


# --- loading -------------------------------------------------------------------------------------------------


def test_output_loading_info_returns_the_patched_model_and_transformers_info(tmp_path):
    model = patched(loud=False)
    batch = inputs(tiny_batch(model))
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "aligned")
    tiny_model("llava").save_pretrained(tmp_path / "plain")
    with normalign.autoload(False):
        _, plain_info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "aligned", output_loading_info=True)
    loaders = [
        normalign.from_pretrained,
        AutoModelForImageTextToText.from_pretrained,
        LlavaForConditionalGeneration.from_pretrained,
        normalign.AutoNormAlignModelForImageTextToText.from_pretrained,
    ]
    for load in loaders:
        loaded, info = load(tmp_path / "aligned", output_loading_info=True)
        assert normalign.is_patched(loaded) and info == plain_info, load
        with torch.no_grad():
            assert torch.equal(loaded(**batch).logits, expected), load
    loaded, info = normalign.AutoNormAlignModelForImageTextToText.from_pretrained(
        tmp_path / "plain", normalign_config="moca", output_loading_info=True
    )
    assert normalign.get_config(loaded).methods == ["moca"] and set(info) >= {"missing_keys", "unexpected_keys"}


# --- output forms --------------------------------------------------------------------------------------------


def test_return_dict_false_loss_includes_pre_and_pre_loss_is_last():
    model = patched(num_hidden_layers=4)
    batch = tiny_batch(model)
    with torch.no_grad():
        as_dict = model(**batch)
        as_tuple = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], as_dict.logits, rtol=0, atol=0)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[-1], as_dict["pre_loss"])
    # By hand: the LM cross entropy from the logits plus weight * the unweighted PRe value.
    logits, labels = as_tuple[1][:, :-1], batch["labels"][:, 1:]
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(as_tuple[0], lm + 0.5 * as_tuple[-1])
    assert as_tuple[-1] > 0


# --- torch.compile -------------------------------------------------------------------------------------------


@pytest.mark.slow
# Qwen2-VL's vision tower does not compile with fullgraph=True even unpatched (torch.split by `lengths.tolist()`).
@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_compiled_fullgraph_forward_equals_eager(family):
    torch._dynamo.reset()
    model = patched(family)
    batch = inputs(tiny_batch(model, ragged=True, padding_side="left"))
    with torch.no_grad():
        eager = model(**batch).logits
        compiled = torch.compile(model, fullgraph=True)(**batch).logits
        unpatched = normalign.unpatch(copy.deepcopy(model))(**batch).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(compiled, unpatched, atol=1e-3)  # the plugin ran inside the graph


@pytest.mark.slow
def test_compiled_fullgraph_training_step_equals_eager():
    torch._dynamo.reset()
    model = patched(num_hidden_layers=4).train()
    batch = tiny_batch(model)
    out = model(**batch)
    out.loss.backward()
    expected, expected_pre = grads(model), out["pre_loss"].detach()
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, fullgraph=True)(**batch)
    out.loss.backward()
    got = grads(model)
    torch.testing.assert_close(out["pre_loss"], expected_pre, rtol=1e-5, atol=1e-6)
    assert {n for n in expected if "normalign" in n} == {n for n, _ in model.named_parameters() if "normalign" in n}
    for name, value in got.items():  # AOT autograd returns zeros where eager leaves None
        torch.testing.assert_close(value, expected.get(name, torch.zeros_like(value)), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_static_cache_generate_with_compiled_forward_equals_eager_generate():
    torch._dynamo.reset()
    model = patched()
    batch = inputs(tiny_batch(model, batch_size=2, ragged=True, padding_side="left"))
    eager = model.generate(**batch, max_new_tokens=5, do_sample=False)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless asked
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = model.generate(
        **batch, max_new_tokens=5, do_sample=False, cache_implementation="static", compile_config=compile_config
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames  # the decode steps were compiled
    assert torch.equal(compiled, eager)


def test_patching_a_compiled_wrapper_patches_the_wrapped_model(tmp_path):
    model = tiny_model("llava")
    batch = inputs(tiny_batch(model))
    with torch.no_grad():
        before = model(**batch).logits
    compiled = torch.compile(model)
    normalign.patch(compiled, methods=["projector_norm", "moca"], moca=normalign.MoCaConfig(init_std=0.3))
    assert normalign.is_patched(compiled) and normalign.is_patched(model) and "normalign" not in compiled._modules
    assert "normalign" in dict(model.named_children())
    compiled.save_pretrained(tmp_path)
    assert (tmp_path / "normalign.safetensors").is_file()
    with torch.no_grad():
        assert torch.equal(normalign.from_pretrained(tmp_path)(**batch).logits, model(**batch).logits)
        assert not torch.equal(model(**batch).logits, before)
    normalign.unpatch(compiled)
    assert not normalign.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


# --- attention implementations, batching, resizing -----------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "internvl"])
def test_sdpa_and_eager_attention_agree_when_patched(family):
    model = patched(family)
    batch = inputs(tiny_batch(model, ragged=True, padding_side="left"))
    results = {}
    with torch.no_grad():
        for impl in ("eager", "sdpa"):
            model.set_attn_implementation(impl)
            results[impl] = model(**batch).logits
        unpatched = normalign.unpatch(copy.deepcopy(model))(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(results["sdpa"][mask], results["eager"][mask], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(results["sdpa"][mask], unpatched[mask], atol=1e-3)


def test_left_padded_batch_equals_single_samples():
    model = patched()
    batch = inputs(tiny_batch(model, batch_size=3, ragged=True, padding_side="left"))
    with torch.no_grad():
        together = model(**batch).logits
        for i in range(3):
            keep = batch["attention_mask"][i].bool()
            alone = model(
                input_ids=batch["input_ids"][i : i + 1, keep],
                attention_mask=batch["attention_mask"][i : i + 1, keep],
                pixel_values=batch["pixel_values"][i : i + 1],
            ).logits
            torch.testing.assert_close(together[i, keep], alone[0], rtol=1e-4, atol=1e-5)


def test_resize_token_embeddings_keeps_the_patch_working():
    identity = normalign.patch(tiny_model("llava"), methods=["moca", "pre"])  # identity MoCa: changes nothing
    reference = tiny_model("llava")
    model = patched()
    batch = inputs(tiny_batch(model))
    with torch.no_grad():
        before = model(**batch).logits
        for m in (identity, reference, model):
            m.resize_token_embeddings(300)
        after = model(**batch).logits
        # The 44 new lm_head rows are drawn at random per model: compare the original vocabulary.
        assert torch.equal(identity(**batch).logits[..., :256], reference(**batch).logits[..., :256])
    assert after.shape[-1] == 300
    torch.testing.assert_close(after[..., :256], before, rtol=1e-5, atol=1e-6)


# --- threads -------------------------------------------------------------------------------------------------


def test_concurrent_forwards_equal_sequential_results():
    model = patched()
    batches = [inputs(tiny_batch(model, batch_size=1 + i % 3, seed=i, ragged=True)) for i in range(8)]
    with torch.no_grad():
        expected = [model(**b).logits for b in batches]
    start = threading.Barrier(4)

    def run(i):
        if i < 4:
            start.wait()
        with torch.no_grad():
            return i % 8, model(**batches[i % 8]).logits

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(40)))
    assert all(torch.equal(logits, expected[i]) for i, logits in results)


def _blocking_layer(model, entered: threading.Event, release: threading.Event):
    """A hook of the test's own on decoder layer 0 that holds the forward there until `release` is set."""

    def hook(module, args, output):
        entered.set()
        assert release.wait(30)

    return get_spec(model).decoder_layers(model)[0].register_forward_hook(hook)


def test_unpatch_refuses_while_a_forward_runs_and_changes_nothing():
    model = patched(loud=False)
    batch = inputs(tiny_batch(model))
    with torch.no_grad():
        expected = model(**batch).logits
        plain = normalign.unpatch(copy.deepcopy(model))(**batch).logits
    entered, release = threading.Event(), threading.Event()
    handle = _blocking_layer(model, entered, release)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: model(**batch).logits)
        assert entered.wait(30)
        with pytest.raises(RuntimeError, match=r"1 forward\(s\) of this model are running"):
            normalign.unpatch(model)
        release.set()
        assert torch.equal(running.result(), expected)  # ran fully patched
    handle.remove()
    assert normalign.is_patched(model)
    normalign.unpatch(model)  # nothing in flight any more
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)


def test_a_forward_that_raised_does_not_block_unpatch():
    model = patched(loud=False)
    batch = inputs(tiny_batch(model))

    def fail(module, args, output):
        raise ValueError("boom")

    handle = get_spec(model).decoder_layers(model)[0].register_forward_hook(fail)
    with pytest.raises(ValueError, match="boom"):
        model(**batch)
    handle.remove()
    normalign.unpatch(model)
    assert not normalign.is_patched(model)


def test_a_forward_starting_during_unpatch_is_refused(monkeypatch):
    model = patched(loud=False)
    batch = inputs(tiny_batch(model))
    removing, resume = threading.Event(), threading.Event()
    remove_hooks = type(model.normalign).remove_hooks

    def slow_remove(self, root):  # unpatch paused before it removes anything
        removing.set()
        assert resume.wait(30)
        remove_hooks(self, root)

    monkeypatch.setattr(type(model.normalign), "remove_hooks", slow_remove)
    with ThreadPoolExecutor(1) as pool:
        unpatching = pool.submit(normalign.unpatch, model)
        assert removing.wait(30)
        with pytest.raises(RuntimeError, match="while this forward starts"):
            model(**batch)
        resume.set()
        unpatching.result()
    assert not normalign.is_patched(model)


def test_forwards_racing_unpatch_run_fully_patched_fully_unpatched_or_are_refused():
    # Issue 22's case: threads running forwards while the main thread unpatches. Whatever the interleaving, each
    # forward equals the patched or the unpatched model's output, or is refused with the documented error.
    model = patched(loud=False)
    batch = inputs(tiny_batch(model))
    with torch.no_grad():
        references = [model(**batch).logits, normalign.unpatch(copy.deepcopy(model))(**batch).logits]
    stop = threading.Event()

    def forwards():
        outcomes = []
        while not stop.is_set():
            try:
                with torch.no_grad():
                    logits = model(**batch).logits
                outcomes.append(next(i for i, r in enumerate(references) if torch.equal(logits, r)))
            except RuntimeError as err:
                assert "unpatch" in str(err)
                outcomes.append("refused")
        return outcomes

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(forwards) for _ in range(2)]
        while True:
            try:
                normalign.unpatch(model)
                break
            except RuntimeError as err:
                assert "are running" in str(err)
        stop.set()
        outcomes = [o for run in runs for o in run.result()]
    assert not normalign.is_patched(model) and outcomes  # StopIteration above: a half-patched output


# --- precision -----------------------------------------------------------------------------------------------


def _fp32_reference_grads(model, batch):
    reference = copy.deepcopy(model)
    reference(**batch).loss.backward()
    return grads(reference)


def _assert_grads_close(got, expected, names, rtol):
    for name in names:
        scale = expected[name].abs().max()
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=rtol * float(scale), msg=name)


@pytest.mark.parametrize("declare", ["set_loss_scaler", "callback"])
def test_pre_weight_is_right_under_fp16_loss_scaling(declare):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    model = patched(num_hidden_layers=4).train()
    batch = tiny_batch(model)
    expected = _fp32_reference_grads(model, batch)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    if declare == "set_loss_scaler":
        normalign.set_loss_scaler(model, scaler)
    else:  # the Trainer's optimizer as accelerate wraps it under fp16 mixed precision on a GPU
        Accelerator(cpu=True)
        try:
            optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), scaler=scaler)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        args = type("Args", (), {"gradient_accumulation_steps": 1})()
        normalign.NormAlignCallback().on_step_begin(args, None, None, model=model, optimizer=optimizer)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(**batch).loss
    scaler.scale(loss).backward()
    got = {name: g / scaler.get_scale() for name, g in grads(model).items()}
    head = [n for n in expected if "pre_head" in n]
    assert head
    _assert_grads_close(got, expected, head, rtol=2e-2)  # weight/scale instead would be off by 4096x
    _assert_grads_close(got, expected, ["model.multi_modal_projector.linear_2.weight"], rtol=5e-2)


def test_fp16_pre_training_without_a_declared_scaler_is_refused():
    model = patched().train()
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError, match="set_loss_scaler"):
        model(**tiny_batch(model))
    normalign.set_loss_scaler(model, None)  # declared: no loss scaling
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isfinite(model(**tiny_batch(model)).loss)


def test_bf16_autocast_runs_the_plugin_in_fp32_with_the_configured_weight():
    model = patched(num_hidden_layers=4).train()
    batch = tiny_batch(model)
    expected = _fp32_reference_grads(model, batch)
    dtypes = []
    for module in (model.normalign.pre_head.fc1, model.normalign.pre_head.fc2):
        module.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch).loss.backward()
    assert dtypes == [torch.float32, torch.float32]
    _assert_grads_close(grads(model), expected, [n for n in expected if "pre_head" in n], rtol=5e-2)


def test_plugin_stays_fp32_when_the_model_is_cast():
    model = patched().to(torch.bfloat16).train()
    assert {p.dtype for p in model.normalign.parameters()} == {torch.float32}
    out = model(**tiny_batch(model))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.normalign.parameters())


def test_pickling_a_patched_model_names_the_library_and_the_fix(tmp_path):
    with pytest.raises(TypeError, match="save_pretrained"):
        torch.save(patched(), tmp_path / "model.pt")


# --- specs against the installed transformers -----------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_builtin_spec_resolves_on_the_installed_transformers(family):
    model = tiny_model(family)
    spec = get_spec(model)
    spec.validate(model)  # raises on a moved module or renamed config attribute
    assert spec.decoder_layers(model)[0] is not None and spec.input_embeddings(model).weight.dim() == 2


def test_a_spec_that_no_longer_matches_names_family_attribute_and_version():
    import transformers

    model = tiny_model("llava")
    spec = dataclasses.replace(get_spec(model), projector="model.mm_projector", image_token_attr="image_placeholder_id")
    with pytest.raises(ValueError) as err:
        spec.validate(model)
    message = str(err.value)
    assert "'llava'" in message and "'model.mm_projector'" in message and "'image_placeholder_id'" in message
    assert f"transformers {transformers.__version__}" in message
