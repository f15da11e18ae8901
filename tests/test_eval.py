"""Issue 23: evaluating aligned checkpoints with the plugin on (lmms-eval's ``--model hf_normalign``)."""

import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hf_normalign as normalign
from hf_normalign.testing import tiny_model, tiny_processor

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is the `eval` extra")
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models.registry_v2 import ModelRegistryV2  # noqa: E402

CONTEXT = "what is shown here?"
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A tiny LLaVA with MoCa far from the identity, saved as an aligned checkpoint with its processor."""
    model = normalign.patch(tiny_model("llava"), methods="moca")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.normalign.moca.values():
            layer.scale.copy_(0.2 + 3 * torch.rand(layer.scale.shape, generator=g))
            layer.shift.copy_(2 * torch.randn(layer.shift.shape, generator=g))
    folder = tmp_path_factory.mktemp("eval") / "aligned"
    model.save_pretrained(folder)
    tiny_processor("llava").save_pretrained(folder)
    return model, folder


def _requests(kind, *args):
    return [
        Instance(
            kind,
            (CONTEXT, *args, lambda doc: [doc["image"]], 0, "t", "test"),
            0,
            {"task": "t", "doc_id": 0, "repeats": 1},
        )
    ]


def _greedy(model, steps=8) -> str:
    """The patched / base model's own greedy continuation of the same prompt, computed without the wrapper."""
    processor = tiny_processor("llava")
    content = [{"type": "image"}, {"type": "text", "text": CONTEXT}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[IMAGE], text=prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    return processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _wrapper(folder):
    """The class lmms-eval resolves for `--model hf_normalign`, through the entry point pyproject.toml declares."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    value = pyproject["project"]["entry-points"]["lmms_eval.models"]["hf_normalign"]
    registry = ModelRegistryV2()
    for manifest in registry._coerce_payload_to_manifests(EntryPoint("hf_normalign", value, "lmms_eval.models").load()):
        registry.register_manifest(manifest)
    lmm = registry.get_model_class("hf_normalign")(pretrained=str(folder), device="cpu", dtype="float32")
    lmm.task_dict = {"t": {"test": {0: {"image": IMAGE}}}}
    return lmm


def test_generate_until_runs_the_patched_model(aligned):
    model, folder = aligned
    lmm = _wrapper(folder)
    (out,) = lmm.generate_until(_requests("generate_until", {"max_new_tokens": 8, "until": []}))
    assert out == _greedy(model)
    base = tiny_model("llava")  # the same base weights (same seed), no MoCa
    assert out != _greedy(base), "the wrapper's output is the base model's: the plugin is not active"


def test_until_cuts_the_continuation(aligned):
    model, folder = aligned
    full = _greedy(model)
    stop = full.split()[1] if len(full.split()) > 1 else full[-1]
    (out,) = _wrapper(folder).generate_until(_requests("generate_until", {"max_new_tokens": 8, "until": [stop]}))
    assert out == full.split(stop)[0]


def test_loglikelihood_of_the_greedy_continuation(aligned):
    model, folder = aligned
    lmm = _wrapper(folder)
    greedy = _greedy(model, steps=3)
    ids = lmm.processor.tokenizer(greedy, add_special_tokens=False).input_ids
    ((logprob, is_greedy),) = lmm.loglikelihood(_requests("loglikelihood", greedy))
    assert is_greedy and len(ids) >= 1
    # by hand: the patched model's probabilities of those tokens, one step at a time
    processor = tiny_processor("llava")
    content = [{"type": "image"}, {"type": "text", "text": CONTEXT}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[IMAGE], text=prompt, return_tensors="pt")
    expected, input_ids = 0.0, inputs["input_ids"]
    with torch.no_grad():
        for token in ids:
            logits = model(input_ids=input_ids, pixel_values=inputs["pixel_values"]).logits[0, -1].double()
            expected += float(logits.log_softmax(-1)[token])
            input_ids = torch.cat([input_ids, torch.tensor([[token]])], 1)
    assert logprob == pytest.approx(expected, abs=1e-4)


def test_a_plain_checkpoint_is_refused(tmp_path):
    tiny_model("llava").save_pretrained(tmp_path / "plain")
    with pytest.raises(normalign.NormAlignCheckpointError, match="not an hf-normalign checkpoint"):
        _wrapper(tmp_path / "plain")
