"""diagnostics.mir: equals mir_from_features on independently captured features; probes; errors; CLI."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import socket

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import vision_mask
from PIL import Image

from hf_normalign.cli import main
from hf_normalign.diagnostics.metrics.mir import MIRResult, mir, mir_from_features
from hf_normalign.diagnostics.probes import (
    EncodedSample,
    Probe,
    default_passages,
    default_probe,
    encode_probe,
    load_probe,
    probe_from_dataset,
)
from hf_normalign.registry import get_spec
from hf_normalign.testing import tiny_model, tiny_processor

N = 10
# The module, not the function of the same name that the diagnostics package exports.
mir_module = importlib.import_module("hf_normalign.diagnostics.runner")  # where run_probe calls capture


def independent_features(model, proc, n: int, final_norm: bool = True):
    """Per-layer vision / text features from a plain forward per sample (no library capture code)."""
    samples = encode_probe(proc, default_probe(n))
    layers = get_spec(model).decoder_layers(model)
    k = len(layers)
    vision, text = [[] for _ in range(k)], [[] for _ in range(k)]
    for s in samples:
        seen: dict = {}
        handle = layers[-1].register_forward_hook(lambda m, a, out, seen=seen: seen.__setitem__("last", out))
        with torch.no_grad():
            hidden = list(model(**s.inputs, output_hidden_states=True, use_cache=False).hidden_states)
        handle.remove()
        if not final_norm:
            hidden[k] = seen["last"]
        vis = vision_mask(model, s.input_ids)
        for layer in range(1, k + 1):
            vision[layer - 1].append(hidden[layer][0][vis])
            text[layer - 1].append(hidden[layer][0][s.text_mask])
    return [torch.cat(v) for v in vision], [torch.cat(t) for t in text]


def assert_same(a: MIRResult, b: MIRResult, rel: float = 1e-6) -> None:
    assert a.mir == pytest.approx(b.mir, rel=rel)
    assert a.per_layer == pytest.approx(b.per_layer, rel=rel)
    assert a.num_vision_tokens == b.num_vision_tokens and a.num_text_tokens == b.num_text_tokens


@pytest.mark.parametrize(("family", "final_norm"), [("llava", True), ("qwen2_5_vl", True), ("gemma3", False)])
def test_mir_equals_mir_from_features_on_independent_features(family, final_norm):
    model, proc = tiny_model(family, num_hidden_layers=3), tiny_processor(family)
    result = mir(model, proc, num_samples=N, final_norm=final_norm, progress=False)
    vision, text = independent_features(model, proc, N, final_norm)
    expected = mir_from_features(vision, text, layer_indices=[1, 2, 3])
    assert_same(result, expected)
    assert result.layers == [1, 2, 3] and result.num_samples == N
    assert result.settings["final_norm"] is final_norm and result.settings["outliers"] == "replace_median"
    assert result.settings["log_base"] == 10


@pytest.mark.parametrize("family", ["llava_next", "qwen3_vl"])
def test_batch_size_1_and_8_agree(family):
    model, proc = tiny_model(family), tiny_processor(family)
    one = mir(model, proc, num_samples=N, batch_size=1, progress=False)
    eight = mir(model, proc, num_samples=N, batch_size=8, progress=False)
    left = mir(model, proc, num_samples=N, batch_size=8, padding_side="left", progress=False)
    assert_same(one, eight)
    assert_same(one, left)


@pytest.mark.parametrize("outliers", ["none", "drop"])
def test_streaming_equals_stored_features(outliers, monkeypatch):
    model, proc = tiny_model("internvl"), tiny_processor("internvl")
    stored = mir(model, proc, num_samples=N, outliers=outliers, streaming=False, progress=False)
    passes = []
    real_capture = mir_module.capture
    monkeypatch.setattr(mir_module, "capture", lambda *a, **k: passes.append(k["layers"]) or real_capture(*a, **k))
    streamed = mir(model, proc, num_samples=N, outliers=outliers, batch_size=3, progress=False)
    assert streamed.settings["streaming"] and not stored.settings["streaming"]
    assert len(passes) == (2 if outliers == "drop" else 1)
    assert_same(streamed, stored, rel=1e-8)  # fp32 features summed in another order
    with pytest.raises(ValueError, match="replace_median"):
        mir(model, proc, num_samples=N, streaming=True, progress=False)


def test_layer_groups_under_a_memory_budget(monkeypatch):
    model, proc = tiny_model("llava", num_hidden_layers=4), tiny_processor("llava")
    whole = mir(model, proc, num_samples=N, progress=False)
    passes = []
    real_capture = mir_module.capture
    monkeypatch.setattr(mir_module, "capture", lambda *a, **k: passes.append(k["layers"]) or real_capture(*a, **k))
    # Each layer holds (vision + text tokens) * hidden floats * 4 bytes; a budget of ~2 layers gives 2 passes.
    hidden = model.config.get_text_config().hidden_size
    per_layer = (whole.num_vision_tokens[0] + whole.num_text_tokens[0]) * hidden * 4
    grouped = mir(model, proc, num_samples=N, max_feature_gb=2.5 * per_layer / 2**30, progress=False)
    assert passes == [[1, 2], [3, 4]]
    assert_same(grouped, whole, rel=1e-12)


def test_layer_selection_and_embeddings():
    model, proc = tiny_model("llava", num_hidden_layers=3), tiny_processor("llava")
    full = mir(model, proc, num_samples=N, include_embeddings=True, progress=False)
    part = mir(model, proc, num_samples=N, layers=[2, -1], progress=False)
    assert full.layers == [0, 1, 2, 3] and part.layers == [2, 3]
    assert part.per_layer == pytest.approx(full.per_layer[2:], rel=1e-9)
    assert part.mir == pytest.approx(math.log10(sum(part.per_layer)))


def test_result_is_json_serialisable():
    model, proc = tiny_model("llava"), tiny_processor("llava")
    result = mir(model, proc, num_samples=6, outliers="drop", log_base=math.e, progress=False)
    data = json.loads(json.dumps(result.to_dict()))
    assert MIRResult.from_dict(data) == result
    assert data["num_samples"] == 6 and data["settings"]["batch_size"] == 8
    assert data["settings"]["probe"].startswith("default") and "layer_numbering" in data["settings"]
    assert result.mir == pytest.approx(math.log(sum(result.per_layer)))


# --- probes ------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_default_probe_is_offline_with_100_distinct_pairs(no_network):
    probe = default_probe()
    assert len(probe) == 100 and len(default_passages()) == 100
    images = [s.load_image() for s in probe]
    assert len({hashlib.sha256(img.tobytes()).hexdigest() for img in images}) == 100
    assert len({s.text for s in probe}) == 100
    assert {s.name.rsplit("-", 1)[1] for s in probe} == {"document", "chart", "scene"}
    assert all(img.size == (336, 336) and img.mode == "RGB" for img in images)
    assert all(40 <= len(s.text.split()) <= 120 for s in probe)
    model, proc = tiny_model("llava"), tiny_processor("llava")
    assert math.isfinite(mir(model, proc, num_samples=4, progress=False).mir)


def test_default_probe_is_deterministic():
    a, b, c = default_probe(6, seed=0), default_probe(6, seed=0), default_probe(6, seed=1)
    assert [s.name for s in a] == [s.name for s in b]
    assert all(x.load_image().tobytes() == y.load_image().tobytes() for x, y in zip(a, b, strict=True))
    assert [s.name for s in a] != [s.name for s in c]
    first = default_probe(100, seed=0)[0].load_image().tobytes()
    assert first != default_probe(100, seed=1)[0].load_image().tobytes()  # images depend on the seed
    with pytest.raises(ValueError, match="100 pairs"):
        default_probe(101)


def _image_folder(tmp_path, n: int, order=None):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in order or range(n):
        Image.new("RGB", (20, 20), (i * 10, 0, 0)).save(folder / f"img_{i:02d}.png")
    (folder / "notes.md").write_text("not an image")
    return folder


def test_load_probe_folder_is_sorted_and_seeded(tmp_path):
    folder = _image_folder(tmp_path, 12, order=[5, 3, 11, 0, 8, 1, 10, 2, 9, 4, 7, 6])
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"passage number {i}" for i in range(12)) + "\n\n")
    full = load_probe(folder, texts, num_samples=None)
    assert [s.name.rsplit("/", 1)[1] for s in full] == [f"img_{i:02d}.png" for i in range(12)]
    assert [s.text for s in full] == [f"passage number {i}" for i in range(12)]
    sub = load_probe(folder, texts, num_samples=5, seed=3)
    again = load_probe(folder, texts, num_samples=5, seed=3)
    other = load_probe(folder, texts, num_samples=5, seed=4)
    assert [s.name for s in sub] == [s.name for s in again] != [s.name for s in other]
    for s in sub:  # image i stays paired with text i
        assert s.text == f"passage number {int(s.name[-6:-4])}"
        assert s.load_image().getpixel((0, 0))[0] == 10 * int(s.name[-6:-4])
    assert sorted(s.name for s in sub) == [s.name for s in sub]


def test_load_probe_text_formats(tmp_path):
    folder = _image_folder(tmp_path, 3)
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for i in (2, 0, 1):
        (text_dir / f"t{i}.txt").write_text(f"  story {i}\nsecond line\n")
    assert [s.text for s in load_probe(folder, text_dir)] == [f"story {i}\nsecond line" for i in range(3)]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"j{i}"}) for i in range(3)))
    assert [s.text for s in load_probe(folder, jsonl)] == ["j0", "j1", "j2"]
    with pytest.warns(UserWarning, match="3 images but 2 texts"):
        assert len(load_probe(folder, ["a", "b"])) == 2


def test_probe_from_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (16, 16), (i, i, i)) for i in range(6)], "caption": [f"c{i}" for i in range(6)]}
    ).cast_column("img", datasets.Image())
    probe = probe_from_dataset(ds, image_column="img", text_column="caption", num_samples=4, seed=1)
    assert len(probe) == 4
    for s in probe:
        i = int(s.name.split()[-1])
        assert s.text == f"c{i}" and s.load_image().getpixel((0, 0)) == (i, i, i)
    raw = probe_from_dataset(
        ds.cast_column("img", datasets.Image(decode=False)), image_column="img", text_column="caption"
    )
    assert raw[5].load_image().getpixel((0, 0)) == (5, 5, 5)
    with pytest.raises(ValueError, match="column 'image'"):
        probe_from_dataset(ds)


# --- errors ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava"), tiny_processor("llava")


def test_error_empty_probe(llava, tmp_path):
    model, proc = llava
    with pytest.raises(ValueError, match="empty probe set"):
        mir(model, proc, [], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty probe set"):
        load_probe(tmp_path / "empty", ["a passage"])


def test_error_image_that_does_not_decode(llava, tmp_path):
    model, proc = llava
    folder = _image_folder(tmp_path, 3)
    (folder / "img_01.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"img_01\.png"):
        mir(model, proc, load_probe(folder, ["a", "b", "c"]), progress=False)


def test_error_fewer_than_two_tokens(llava):
    model, proc = llava
    probe = Probe.from_pairs([(Image.new("RGB", (32, 32)), "a")] * 2)
    one, other = encode_probe(proc, probe)
    assert one.num_text_tokens == 1
    other = EncodedSample(other.inputs, torch.zeros_like(other.text_mask), "no text")  # encoded samples may have none
    with pytest.raises(ValueError, match="at least 2 text tokens"):
        mir(model, proc, [one, other], progress=False)


@pytest.mark.parametrize("outliers", ["replace_median", "none"])
def test_error_non_finite_features_name_the_layer(outliers):
    model, proc = tiny_model("llava", num_hidden_layers=3), tiny_processor("llava")
    layers = get_spec(model).decoder_layers(model)
    layers[1].register_forward_hook(lambda m, a, out: out * float("nan"))  # decoder layer 2 (1-based)
    with pytest.raises(ValueError, match="layer 2: .*non-finite"):
        mir(model, proc, num_samples=3, layers=[1, 2], outliers=outliers, progress=False)


def test_error_prompt_without_vision_tokens(llava):
    model, proc = llava
    sample = encode_probe(proc, default_probe(2))[0]
    ids = sample.input_ids.clone()
    ids[vision_mask(model, ids)] = 7
    broken = EncodedSample({**sample.inputs, "input_ids": ids[None]}, sample.text_mask, "sample-x")
    with pytest.raises(ValueError, match="sample-x: the prompt has no vision tokens"):
        mir(model, proc, [sample, broken], progress=False)


# --- command line ------------------------------------------------------------------------------------


def test_cli_under_accelerate_launch_refuses_a_device_of_its_own(tmp_path, capsys, monkeypatch):
    tiny_model("llava").save_pretrained(tmp_path / "m")
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "2")  # what accelerate launch sets; refused before any process group starts
    assert main(["mir", str(tmp_path / "m"), "--device", "cuda:1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "each process runs its own copy" in err and "--device cpu or cuda" in err


def test_cli_on_a_saved_model(tmp_path, capsys):
    model, proc = tiny_model("llava", num_hidden_layers=3), tiny_processor("llava")
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    out = tmp_path / "mir.json"
    code = main(["mir", str(tmp_path / "m"), "--num-samples", "6", "--batch-size", "4", "--layers", "1-2,-1",
                 "--json", str(out), "--device", "cpu", "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "MIR = " in printed and "layer" in printed and "share" in printed
    result = MIRResult.from_dict(json.loads(out.read_text()))
    expected = mir(model, proc, num_samples=6, progress=False)
    assert result.layers == [1, 2, 3]
    assert result.per_layer == pytest.approx(expected.per_layer, rel=1e-6)

    folder = _image_folder(tmp_path, 4)
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(default_passages()[:4]))
    code = main(["mir", str(tmp_path / "m"), "--images", str(folder), "--texts", str(texts), "--no-final-norm",
                 "--outliers", "none", "--json", str(out), "--device", "cpu", "--no-progress"])  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    assert data["num_samples"] == 4 and data["settings"]["final_norm"] is False and data["settings"]["streaming"]


# --- wrapped and quantised models --------------------------------------------------------------------


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model, proc = tiny_model("qwen2_vl"), tiny_processor("qwen2_vl")
    plain = mir(model, proc, num_samples=4, progress=False)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert_same(mir(wrapped, proc, num_samples=4, progress=False), plain)  # LoRA B starts at 0: same model


def test_4bit_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    model, proc = tiny_model("llava"), tiny_processor("llava")
    model.save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    quantised = AutoModelForImageTextToText.from_pretrained(
        tmp_path, quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
    )
    result = mir(quantised, proc, num_samples=4, outliers="none", progress=False)
    assert math.isfinite(result.mir) and result.settings["model_dtype"] == "bfloat16"


# --- reference preset and text-token choice ----------------------------------------------------------

# The reference script's vicuna_v1 conversation, written out by hand (system, USER turn with the image,
# ASSISTANT turn with the passage, closed by "</s>").
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _lower_median(x, axis=0):
    return np.take(np.sort(x, axis=axis), (x.shape[axis] - 1) // 2, axis=axis)


def _reference_layer_fid(v: np.ndarray, t: np.ndarray) -> float:
    """The reference's per-layer steps by hand in float64: scale, torch-rule 3-sigma replace, FID via sqrtm."""
    alpha = 1 / np.linalg.norm(t, axis=1).mean()
    v, t = v * alpha, t * alpha
    for x in (v, t):
        norms = np.linalg.norm(x, axis=1)
        out = np.abs(norms - _lower_median(norms)) > 3 * np.std(norms, ddof=1)
        x[out] = _lower_median(x)
    sv, st = np.cov(v, rowvar=False), np.cov(t, rowvar=False)
    diff = v.mean(0) - t.mean(0)
    return float(diff @ diff + np.trace(sv) + np.trace(st) - 2 * np.trace(scipy.linalg.sqrtm(sv @ st).real))


def test_reference_preset_equals_all_tokens_after_the_image_by_hand():
    model, proc = tiny_model("llava", num_hidden_layers=3), tiny_processor("llava")
    probe = default_probe(N)
    k = 3
    vision, text = [[] for _ in range(k)], [[] for _ in range(k)]
    for sample in probe:
        prompt = f"{VICUNA_SYSTEM} USER: <image>\n ASSISTANT: {sample.text}</s>"
        inputs = proc(text=[prompt], images=[sample.load_image()], return_tensors="pt")
        ids = inputs["input_ids"][0]
        image_pos = (ids == model.config.image_token_id).nonzero().squeeze(1)
        after = torch.arange(len(ids)) > image_pos.max()  # every token after the image block
        assert ids[-1] == proc.tokenizer.eos_token_id and int(after.sum()) > len(proc.tokenizer(sample.text).input_ids)
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        for layer in range(1, k + 1):
            vision[layer - 1].append(hidden[layer][0][image_pos].double().numpy())
            text[layer - 1].append(hidden[layer][0][after].double().numpy())
    expected = [_reference_layer_fid(np.concatenate(v), np.concatenate(t)) for v, t in zip(vision, text, strict=True)]

    result = mir(model, proc, probe, num_samples=None, preset="reference", progress=False)
    assert result.per_layer == pytest.approx(expected, rel=1e-6)
    assert result.mir == pytest.approx(math.log10(sum(expected)), rel=1e-6)
    assert result.num_text_tokens == [sum(len(t) for t in text[0])] * k
    assert result.settings["text_tokens"] == "after_image" and result.settings["preset"] == "reference"
    # The same features with the passage only give another number (the 0.539 vs 0.430 effect).
    passage = mir(model, proc, probe, num_samples=None, prompt=result.settings["prompt"], progress=False)
    assert passage.num_text_tokens[0] < result.num_text_tokens[0]


def test_text_tokens_after_image_without_preset_and_preset_clashes(llava):
    model, proc = llava
    probe = default_probe(4)
    after = mir(model, proc, probe, num_samples=None, text_tokens="after_image", progress=False)
    passage = mir(model, proc, probe, num_samples=None, progress=False)
    assert after.num_text_tokens[0] > passage.num_text_tokens[0]
    with pytest.raises(ValueError, match="outliers='drop'"):
        mir(model, proc, probe, preset="reference", outliers="drop", progress=False)
    with pytest.raises(ValueError, match="prompt"):
        mir(model, proc, probe, preset="reference", prompt="<image>{text}", progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        mir(model, proc, probe, preset="paper", progress=False)
    with pytest.raises(ValueError, match="text_tokens must be one of"):
        mir(model, proc, probe, text_tokens="all", progress=False)


def test_cli_reference_preset(tmp_path, capsys):
    model, proc = tiny_model("llava", num_hidden_layers=2), tiny_processor("llava")
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    out = tmp_path / "mir.json"
    code = main(["mir", str(tmp_path / "m"), "--preset", "reference", "--num-samples", "4", "--json", str(out),
                 "--device", "cpu", "--no-progress"])  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    expected = mir(model, proc, num_samples=4, preset="reference", progress=False)
    assert data["settings"]["preset"] == "reference"
    assert data["per_layer"] == pytest.approx(expected.per_layer, rel=1e-6)
