"""Tests for hf_normalign.testing: every tiny family builds, runs, pads, generates and (mostly) processes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import processor_or_skip
from PIL import Image
from transformers.utils import is_num2words_available, is_torchvision_available

from hf_normalign.testing import (
    TINY_FAMILIES,
    tiny_batch,
    tiny_config,
    tiny_model,
    tiny_processor,
    tiny_text_batch,
    tiny_tokenizer,
)

IMAGE_ID = 250
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids")
# Processors that cannot be built here (see tiny_processor's docstring).
NO_PROCESSOR = {"mistral3"} if not is_torchvision_available() else set()
NO_PROCESSOR |= {"smolvlm"} if not is_num2words_available() else set()

families = pytest.mark.parametrize("family", TINY_FAMILIES)


@functools.cache
def model_for(family: str) -> torch.nn.Module:
    """One model per family for the whole module (tests only read it)."""
    return tiny_model(family)


def sample(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample ``i`` of a batch as a batch of one, with its padding removed.

    Every image tensor holds the same number of rows per sample (one image per sample), so it splits evenly.
    """
    size = batch["input_ids"].shape[0]
    keep = batch["attention_mask"][i].bool()
    out = {}
    for key, value in batch.items():
        if key in SEQUENCE_KEYS:
            out[key] = value[i : i + 1, keep]
        else:
            rows = value.shape[0] // size
            out[key] = value[i * rows : (i + 1) * rows]
    return out


def test_families_cover_the_supported_model_types():
    assert set(TINY_FAMILIES) == {
        "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
        "internvl", "gemma3", "idefics3", "smolvlm", "mistral3", "paligemma",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown tiny family"):
        tiny_config("blip2")


@families
def test_config_and_tokenizer_agree_on_ids(family):
    cfg = tiny_config(family)
    text = cfg.get_text_config()
    assert cfg.model_type == family
    assert text.vocab_size == 256 and text.num_hidden_layers == 2
    ids = {k: getattr(cfg, k) for k in dir(cfg) if k.endswith(("token_id", "token_index")) and "pad" not in k}
    ids |= {k: getattr(text, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert all(0 <= v < 256 for v in ids.values() if isinstance(v, int)), ids

    tok = tiny_tokenizer(family)
    assert len(tok) == 256
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(cfg.image_token_id)) == cfg.image_token_id
    assert tok.convert_ids_to_tokens(cfg.image_token_id) in tok.all_special_tokens
    ids = tok("what is on the table?").input_ids
    assert ids[0] == 1 and all(4 <= i < 200 for i in ids[1:])
    assert tok.decode(ids, skip_special_tokens=True).strip() == "what is on the table?"


@families
def test_model_is_deterministic_eval_and_has_nonzero_embeddings(family):
    rng_state = torch.random.get_rng_state()
    model = model_for(family)
    assert not model.training
    assert type(model).__name__.endswith("ForConditionalGeneration")
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == 256
    zero_rows = (emb.norm(dim=-1) == 0).nonzero().flatten().tolist()
    assert zero_rows in ([], [0])  # at most the pad row
    assert not [n for n, p in model.named_parameters() if p.dim() >= 2 and not p.any()]

    again = tiny_model(family)
    pairs = zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(emb, tiny_model(family, seed=1).get_input_embeddings().weight)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # global RNG untouched


@families
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_ragged_batch_gives_finite_loss(family, padding_side):
    batch = tiny_batch(family, ragged=True, padding_side=padding_side, seq_text=10)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert (mask.sum(-1)[0] > mask.sum(-1)[1]).item()  # sample 1 is shorter, hence padded
    pad_col = 0 if padding_side == "left" else -1
    assert mask[1, pad_col] == 0 and ids[1, pad_col] == 0 and mask[0].all()
    assert (labels[mask == 0] == -100).all() and (labels[ids == IMAGE_ID] == -100).all()
    image_rows = (ids == IMAGE_ID).sum(-1)
    assert image_rows[0] > 0 and image_rows[0] == image_rows[1]
    with torch.no_grad():
        out = model_for(family)(**batch)
    assert torch.isfinite(out.loss)


@families
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_matches_single_sample_runs(family, padding_side):
    model = model_for(family)
    batch = tiny_batch(model, ragged=True, padding_side=padding_side, seq_text=10, with_labels=False)
    with torch.no_grad():
        logits = model(**batch).logits
        for i in range(2):
            single = model(**sample(batch, i)).logits[0]
            keep = batch["attention_mask"][i].bool()
            torch.testing.assert_close(logits[i, keep], single, atol=1e-5, rtol=1e-4)


@families
def test_several_images_per_sample(family):
    batch = tiny_batch(family, images_per_sample=2, ragged=True, padding_side="left")
    with torch.no_grad():
        assert torch.isfinite(model_for(family)(**batch).loss)


@families
def test_text_only_batch(family):
    batch = tiny_text_batch(family, ragged=True, padding_side="left", seq_len=6)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"][1].tolist() == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        assert torch.isfinite(model_for(family)(**batch).loss)


@families
def test_generate_with_kv_cache(family):
    model = model_for(family)
    batch = tiny_batch(model, ragged=True, padding_side="left", with_labels=False)
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=False)
    assert cached.shape == (2, batch["input_ids"].shape[1] + 3)
    assert torch.equal(cached, uncached)


@families
def test_text_overrides_resize_the_decoder(family):
    model = tiny_model(family, num_hidden_layers=3, hidden_size=64, dtype=torch.bfloat16)
    assert model.config.get_text_config().num_hidden_layers == 3
    assert model.get_input_embeddings().weight.shape == (256, 64)
    batch = tiny_batch(model)
    assert batch["pixel_values"].dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


@families
def test_processor_output_runs_through_the_model(family):
    if family in NO_PROCESSOR:
        with pytest.raises(NotImplementedError, match="cannot be built here"):
            tiny_processor(family)
        return
    proc = processor_or_skip(family)
    rng = np.random.default_rng(0)
    sizes = [(40, 48), (32, 24)]  # not the tile size: the processor resizes
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    prompts = [
        proc.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for question in ["what is in the picture?", "describe it."]
    ]
    inputs = proc(images=[[im] for im in images], text=prompts, padding=True, return_tensors="pt")
    inputs.pop("labels", None)  # PaliGemma returns all -100 labels without a suffix
    assert (inputs["input_ids"] == IMAGE_ID).sum(-1).min() > 0
    with torch.no_grad():
        logits = model_for(family)(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
