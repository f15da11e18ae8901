"""patch() checks the placeholder token ids it reads from the config before any hook is installed."""

import dataclasses

import pytest
import torch

import hf_normalign as normalign
from hf_normalign.testing import tiny_batch, tiny_model


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        (999999, r"config.image_token_id is 999999, but this 'llava' model's input embedding has 256 rows"),
        ("250", r"config.image_token_id of this 'llava' model is '250' \(str\); it must be .* an integer >= 0"),
        (True, r"is True \(bool\)"),
        (-1, r"is -1 \(int\)"),
        (250.0, r"is 250.0 \(float\)"),
    ],
)
def test_a_bad_image_token_id_is_refused_at_patch_time(value, phrase):
    model = tiny_model("llava")
    model.config.image_token_id = value
    with pytest.raises(ValueError, match=phrase) as err:
        normalign.patch(model, methods="moca")
    assert "model.config.image_token_id = processor.tokenizer.convert_tokens_to_ids" in str(err.value)
    assert not normalign.is_patched(model) and not hasattr(model, "normalign")


def test_the_last_embedding_row_is_a_valid_placeholder():
    model = tiny_model("llava")
    rows = model.get_input_embeddings().weight.shape[0]
    model.config.image_token_id = rows - 1
    assert normalign.patch(model, methods="moca").normalign.vision_token_ids == [rows - 1]


def test_families_that_remap_an_out_of_vocabulary_placeholder_accept_one():
    """Gemma 3 swaps an image id >= its vocabulary for 0 before embedding (transformers' own rule): the forward
    works, so patch must not refuse it."""
    model = tiny_model("gemma3")
    batch = tiny_batch(model)
    outside = model.get_input_embeddings().weight.shape[0] + 1000
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, outside)
    model.config.image_token_id = outside
    with torch.no_grad():
        reference = model(**batch).logits
        normalign.patch(model, methods="moca")  # identity init
        assert torch.equal(model(**batch).logits, reference)


def test_a_config_without_the_placeholder_attribute_names_it_the_family_and_the_fix():
    model = tiny_model("llava")
    spec = dataclasses.replace(normalign.get_spec(model), image_token_attr="image_placeholder_id")
    with pytest.raises(ValueError) as err:
        spec.validate(model)
    message = str(err.value)
    assert "'llava' model's config (LlavaConfig) has no attribute 'image_placeholder_id'" in message
    assert "model.config.image_placeholder_id = " in message and "image_token_attr='<name>'" in message
    assert "outside the range" not in message  # not a transformers-version problem


def test_an_unset_placeholder_id_names_the_attribute_and_the_fix():
    model = tiny_model("llava")
    model.config.image_token_id = None
    with pytest.raises(ValueError, match="config.image_token_id is not set on this 'llava' config") as err:
        normalign.patch(model, methods="moca")
    assert "model.config.image_token_id = processor.tokenizer.convert_tokens_to_ids" in str(err.value)
