"""Issue: MoCa and PRe. Every expected value comes from an unpatched forward or a by-hand formula."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_FAMILIES, REQUIRED_FAMILIES, ReporterSpy
from helpers import grads, make_vision_loud, vision_mask

import hf_normalign as normalign
from hf_normalign.testing import tiny_batch, tiny_model, tiny_text_batch


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_moca_identity_init_is_exact(family):
    model = tiny_model(family)
    batch = tiny_batch(model, ragged=True, padding_side="left")
    with torch.no_grad():
        expected = model(**batch).logits
        normalign.patch(model, methods="moca")
        assert torch.equal(model(**batch).logits, expected)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_moca_random_calibration_matches_unpatched_states(family):
    model = tiny_model(family)
    batch = tiny_batch(model, with_labels=False)
    text_batch = tiny_text_batch(model, with_labels=False)
    mask = vision_mask(model, batch["input_ids"])
    with torch.no_grad():
        reference = model(**batch, output_hidden_states=True).hidden_states
        text_logits = model(**text_batch).logits
        full_logits = model(**batch).logits
        normalign.patch(model, moca=normalign.MoCaConfig(init_std=0.5, layers=[0]))
        moca = model.normalign.moca["layer_0_norm"]
        patched = model(**batch, output_hidden_states=True)
        # hidden_states[1] is the output of decoder layer 0.
        h = reference[1][mask].double()
        expected = (h * moca.scale.double() + moca.shift.double()).float()
        torch.testing.assert_close(patched.hidden_states[1][mask], expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(patched.hidden_states[1][~mask], reference[1][~mask])
        assert torch.equal(model(**text_batch).logits, text_logits)
        first_image = int(mask[0].nonzero()[0])
        assert torch.equal(patched.logits[:, :first_image], full_logits[:, :first_image])
        assert not torch.allclose(patched.logits[:, first_image:], full_logits[:, first_image:])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_moca_generate_with_cache_equals_greedy_full_forwards(family):
    model = tiny_model(family)
    make_vision_loud(model)
    normalign.patch(model, moca=normalign.MoCaConfig(init_std=0.3))
    batch = tiny_batch(model, batch_size=1, with_labels=False)
    steps = 5
    generated = model.generate(**batch, max_new_tokens=steps, do_sample=False, use_cache=True)
    inputs = dict(batch)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(**inputs, use_cache=False).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], token], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
            for key in ("mm_token_type_ids", "token_type_ids"):
                if key in inputs:
                    inputs[key] = torch.cat([inputs[key], torch.zeros_like(token)], dim=1)
    assert torch.equal(generated, inputs["input_ids"])


def _manual_losses(reference_model, head, batch, layer, weight):
    """LM loss + weight * PRe from an unpatched `output_hidden_states` forward, by hand."""
    out = reference_model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    mask = vision_mask(reference_model, batch["input_ids"])
    anchor = out.hidden_states[0][mask].detach()
    h = out.hidden_states[layer + 1][mask]
    prediction = head(h)
    pre = (1 - F.cosine_similarity(prediction, anchor, dim=-1)).mean()
    return lm, pre, lm + weight * pre


def _pair(family="llava", **pre_kwargs):
    model = tiny_model(family, num_hidden_layers=4)
    make_vision_loud(model)
    reference = copy.deepcopy(model)
    normalign.patch(model, pre=normalign.PReConfig(**pre_kwargs))
    head = copy.deepcopy(model.normalign.pre_head)
    return model, reference, head


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_pre_loss_equals_independent_computation(family):
    model, reference, head = _pair(family)
    batch = tiny_batch(model)
    with torch.no_grad():
        out = model(**batch)
        _, pre, total = _manual_losses(reference, head, batch, layer=2, weight=0.5)
    torch.testing.assert_close(out["pre_loss"], pre, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-6)


def test_pre_gradients_reach_params_through_outputs_loss_and_through_own_cross_entropy():
    model, reference, head = _pair("llava", weight=0.7)
    batch = tiny_batch(model)
    model.train()
    reference.train()
    head.train()
    _, _, total = _manual_losses(reference, head, batch, layer=2, weight=0.7)
    total.backward()
    expected = grads(reference)
    expected_head = grads(head)

    model(**batch).loss.backward()
    via_loss = grads(model)
    model.zero_grad()
    # A trainer that ignores outputs.loss (TRL) and builds the cross entropy itself.
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
    via_own_ce = grads(model)
    for got in (via_loss, via_own_ce):
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-7)
        for name, value in expected_head.items():
            torch.testing.assert_close(got[f"normalign.pre_head.{name}"], value, rtol=1e-4, atol=1e-7)


def test_pre_no_work_in_eval_without_labels_and_zero_without_vision():
    model, _, _ = _pair("llava")
    calls = []
    model.normalign.pre_head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model(**tiny_batch(model, with_labels=False))
    assert calls == [] and "pre_loss" not in out
    model.train()
    out = model(**tiny_text_batch(model))
    assert out["pre_loss"].item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_left_padded_batch_equals_single_sample_runs():
    model = tiny_model("llava", num_hidden_layers=4)
    make_vision_loud(model)
    normalign.patch(model, moca=normalign.MoCaConfig(init_std=0.3), pre=True)
    batch = tiny_batch(model, batch_size=3, ragged=True, padding_side="left")
    with torch.no_grad():
        out = model(**batch)
        singles = []
        for i in range(3):
            keep = batch["attention_mask"][i].bool()
            one = {k: (v[i : i + 1, keep] if v.dim() == 2 else v[i : i + 1]) for k, v in batch.items()}
            single = model(**one)
            torch.testing.assert_close(out.logits[i, keep], single.logits[0], rtol=1e-4, atol=1e-5)
            singles.append(single["pre_loss"])
    # Same number of vision tokens per sample: the batch PRe is the mean of the per-sample ones.
    torch.testing.assert_close(out["pre_loss"], torch.stack(singles).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_all_three_methods_gradient_checkpointing_gives_same_gradients(family):
    batch = None
    runs = []
    for checkpointing in (False, True):
        model = tiny_model(family, num_hidden_layers=4)
        make_vision_loud(model)
        torch.manual_seed(0)  # the PRe head's init draws from the global RNG
        normalign.patch(model, methods=["projector_norm", "moca", "pre"], moca=normalign.MoCaConfig(init_std=0.1))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = batch or tiny_batch(model)
        out = model(**batch)
        out.loss.backward()
        runs.append(grads(model))
    plain, checkpointed = runs
    assert plain.keys() == checkpointed.keys()
    plugin = [n for n in plain if n.startswith("normalign.")]
    assert any("moca" in n for n in plugin) and any("pre_head" in n for n in plugin)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_layer_errors():
    with pytest.raises(ValueError, match=r"PReConfig.layer=7 is out of range.*4 decoder layers"):
        normalign.patch(tiny_model("llava", num_hidden_layers=4), pre=normalign.PReConfig(layer=7))
    with pytest.raises(ValueError, match=r"MoCaConfig.layers names layers \[5\].*valid: 0..3"):
        normalign.patch(tiny_model("llava", num_hidden_layers=4), moca=normalign.MoCaConfig(layers=[1, 5]))


def test_moca_parameters_excluded_from_trainer_weight_decay():
    from transformers import Trainer, TrainingArguments

    model = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca", "pre"])
    trainer = Trainer(model=model, args=TrainingArguments("unused", weight_decay=0.1, report_to=[]))
    decayed = set(trainer.get_decay_parameter_names(model))
    plugin = {n for n, _ in model.named_parameters() if n.startswith("normalign.")}
    assert not {n for n in plugin if ".moca." in n or "projector_norm" in n} & decayed
    assert "normalign.pre_head.fc1.weight" in decayed


# accepts_loss_kwargs True / False; fp16=True: the Trainer's fp16 path as it runs on CPU (no scaler there).
@pytest.mark.parametrize(("family", "fp16"), [("llava", False), ("qwen2_5_vl", False), ("llava", True)])
def test_trainer_gradient_accumulation_matches_large_batch(family, fp16, tmp_path):
    from transformers import Trainer, TrainingArguments

    # Each sample keeps its leading batch dim (Qwen's pixel_values are patch rows), so one
    # torch.cat per key collates every family.
    samples = [tiny_batch(family, batch_size=1, seed=seed) for seed in range(4)]

    def collate(rows):
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def run(batch_size, accumulation):
        torch.manual_seed(0)
        model = tiny_model(family, num_hidden_layers=4)
        make_vision_loud(model)
        normalign.patch(model, methods=["projector_norm", "moca", "pre"], moca=normalign.MoCaConfig(init_std=0.1))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = TrainingArguments(
            str(tmp_path / f"run{batch_size}"),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=0.5,
            optim="sgd",
            lr_scheduler_type="constant",
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            seed=0,
            dataloader_drop_last=True,
            remove_unused_columns=False,
            fp16=fp16,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=samples,
            data_collator=collate,
            callbacks=[normalign.NormAlignCallback()],
        )
        trainer.train()
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}, trainer.state.log_history

    accumulated, history = run(2, 2)
    large, _ = run(4, 1)
    assert any("pre_loss" in entry for entry in history)
    for name, update in large.items():
        torch.testing.assert_close(accumulated[name], update, rtol=1e-4, atol=1e-7, msg=name)
    assert large["normalign.pre_head.fc1.weight"].abs().sum() > 0


def test_pre_layer_numbering_paper_helper_and_saved_note():
    # The paper's "layer 16 of 32" counts from 1: the 16th decoder layer is module index 15, whose
    # output transformers reports as hidden_states[16] (what the diagnostics call layer 16).
    cfg = normalign.PReConfig.from_paper_layer(16, weight=0.25)
    assert (cfg.layer, cfg.weight) == (15, 0.25)
    saved = cfg.to_dict()
    assert "hidden_states[layer + 1]" in saved["layer_numbering"]
    assert normalign.PReConfig.from_dict(saved) == cfg
    with pytest.raises(ValueError, match="counted from 1"):
        normalign.PReConfig.from_paper_layer(0)


def test_callback_factors_do_not_outlive_the_training_run(tmp_path):
    """After `trainer.train()` the patched model computes `outputs.loss` exactly as before training started."""
    from transformers import Trainer, TrainingArguments

    model = normalign.patch(tiny_model("llava"), methods="pre")
    samples = [tiny_batch("llava", batch_size=1, seed=s) for s in range(2)]
    args = TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.0,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
    )
    collate = lambda rows: {k: torch.cat([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    Trainer(
        model=model, args=args, train_dataset=samples, data_collator=collate, callbacks=[normalign.NormAlignCallback()]
    ).train()
    plugin = model.normalign
    run = plugin.pre_run
    assert (run.grad_scale, run.loss_term_scale, run.loss_scaler_declared) == (1.0, 1.0, False)
    out = model(**samples[0])
    logits, labels = out.logits[:, :-1], samples[0]["labels"][:, 1:]
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, lm + 0.5 * out["pre_loss"])


def test_pre_loss_is_reported_with_the_loss(tmp_path):
    """`pre_loss` is in the step's log that reporting integrations (which the Trainer runs before user callbacks)
    and `log_history` get: at lr 0 over both samples, the mean of the model's own `pre_loss` on each."""
    from transformers import Trainer, TrainingArguments

    model = normalign.patch(tiny_model("llava"), methods="pre")
    samples = [tiny_batch("llava", batch_size=1, seed=s) for s in range(2)]
    with torch.no_grad():
        expected = sum(model(**sample)["pre_loss"].item() for sample in samples) / 2
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=1, max_steps=2, logging_steps=2, learning_rate=0.0,
        report_to=[], save_strategy="no", remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    collate = lambda rows: {k: torch.cat([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    reporter = ReporterSpy()
    trainer = Trainer(
        model=model, args=args, train_dataset=samples, data_collator=collate,
        callbacks=[reporter, normalign.NormAlignCallback()],
    )  # fmt: skip
    trainer.train()
    (reported,) = [logs for logs in reporter.logged if "loss" in logs]
    (stored,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert reported["pre_loss"] == stored["pre_loss"] == pytest.approx(expected, rel=1e-5)
