"""Probe-size limits of the diagnostics: MIR needs at least two pairs; over-long passages are refused, not cut."""

import pytest
import torch

from hf_normalign.diagnostics import mir
from hf_normalign.diagnostics.probes import MAX_PASSAGE_TOKENS, Probe, default_probe, prepare_probe
from hf_normalign.testing import tiny_model, tiny_processor


def test_mir_refuses_a_single_pair():
    model, processor = tiny_model("llava"), tiny_processor("llava")
    with pytest.raises(ValueError, match="needs at least 2, got 1.*num_samples >= 2.*N >= 20"):
        mir(model, processor, num_samples=1, progress=False)
    with pytest.raises(ValueError, match="needs at least 2, got 1"):  # a probe of one pair, whatever num_samples
        mir(model, processor, default_probe()[:1], num_samples=None, progress=False)
    assert mir(model, processor, num_samples=2, progress=False).num_samples == 2


def _long_probe(words: int) -> Probe:
    image = default_probe()[0].image
    return Probe.from_pairs([(image, "a short passage."), (image, " ".join(["word"] * words))], name="long")


def test_an_over_long_passage_is_refused_naming_it_and_the_limit():
    processor = tiny_processor("llava")
    with pytest.raises(ValueError) as err:
        prepare_probe(processor, _long_probe(50_000))
    message = str(err.value)
    assert message.startswith("long[1]: the passage has ")  # the second pair, by name
    assert f"more than max_passage_tokens={MAX_PASSAGE_TOKENS}" in message and "prepare_probe(" in message
    with pytest.raises(ValueError, match=r"long\[1\]: the passage has"):  # through a metric too, before any forward
        mir(tiny_model("llava"), processor, _long_probe(50_000), progress=False)


def test_a_passage_at_the_limit_is_kept_whole_and_the_limit_can_be_raised():
    processor = tiny_processor("llava")
    whole = prepare_probe(processor, _long_probe(300), max_passage_tokens=10**6)[1]
    n = whole.num_text_tokens
    at_limit = prepare_probe(processor, _long_probe(300), max_passage_tokens=n)[1]
    assert torch.equal(at_limit.input_ids, whole.input_ids) and torch.equal(at_limit.text_mask, whole.text_mask)
    with pytest.raises(ValueError, match=f"the passage has {n} tokens, more than max_passage_tokens={n - 1}"):
        prepare_probe(processor, _long_probe(300), max_passage_tokens=n - 1)


@pytest.mark.parametrize("limit", [0, 2.5, True, "4096"])
def test_the_limit_itself_is_checked(limit):
    with pytest.raises(ValueError, match="max_passage_tokens must be an integer >= 1"):
        prepare_probe(tiny_processor("llava"), None, num_samples=2, max_passage_tokens=limit)
