"""Issue 12: the catalogue of bad inputs. Each case: the input, the exception type, a phrase of its message.

The first block was silently accepted (or failed unhelpfully) before issue 12; the second already behaved and
must keep doing so. CLI and recipe cases live in tests/test_cli.py and tests/test_recipes.py.
"""

import json
import math
import os
import shutil

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForImageTextToText

import hf_normalign as normalign
from hf_normalign.config import MoCaConfig, NormAlignConfig, PReConfig, ProjectorNormConfig
from hf_normalign.persistence.format import file_sha256
from hf_normalign.testing import tiny_model

CheckpointError = normalign.NormAlignCheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca", "pre"]).save_pretrained(root / "ckpt")
    normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca", "pre"]).save_pretrained(root / "other")
    adapter = normalign.patch(tiny_model("llava"), methods="moca")
    normalign.save_pretrained(adapter, root / "adapter", adapter_only=True, base_model_name_or_path="/gone/base")
    return root


def _copy(saved, tmp_path, name="ckpt"):
    return shutil.copytree(saved / name, tmp_path / name)


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _flip_bytes(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    data = bytearray((ckpt / "normalign.safetensors").read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])  # inside the tensor data, not the header
    (ckpt / "normalign.safetensors").write_bytes(bytes(data))
    return ckpt


def _truncate(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    data = (ckpt / "normalign.safetensors").read_bytes()
    (ckpt / "normalign.safetensors").write_bytes(data[: len(data) // 2])
    return ckpt


def _swap(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    shutil.copy(saved / "other" / "normalign.safetensors", ckpt / "normalign.safetensors")
    return ckpt


def _non_finite(saved, tmp_path):
    """NaN weights whose hash is recorded: what a diverged training run saves."""
    ckpt = _copy(saved, tmp_path)
    tensors = safetensors.torch.load_file(ckpt / "normalign.safetensors")
    tensors["moca.layer_0_norm.scale"][0] = math.nan
    safetensors.torch.save_file(tensors, ckpt / "normalign.safetensors")
    digest = file_sha256(str(ckpt / "normalign.safetensors"))
    _edit_json(ckpt / "normalign_config.json", lambda d: d["sha256"].update({"normalign.safetensors": digest}))
    return ckpt


def _no_config_json(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    os.remove(ckpt / "config.json")
    return ckpt


def _wider_config_json(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    _edit_json(ckpt / "config.json", lambda d: d["text_config"].update(hidden_size=4096))
    return ckpt


def _latin1_config(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    (ckpt / "normalign_config.json").write_bytes('{"méthodes": 1}'.encode("latin-1"))
    return ckpt


def _no_method(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    _edit_json(ckpt / "normalign_config.json", lambda d: d.update(methods={}))
    return ckpt


def _gwc_no(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    _edit_json(ckpt / "normalign_config.json", lambda d: d["methods"]["projector_norm"].update(gwc="no"))
    return ckpt


def _future_format(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    _edit_json(ckpt / "normalign_config.json", lambda d: d.update(format_version=99))
    return ckpt


def _no_weights(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    os.remove(ckpt / "normalign.safetensors")
    return ckpt


def _plain(saved, tmp_path):
    tiny_model("llava").save_pretrained(tmp_path / "plain")
    return tmp_path / "plain"


def _meta_model():
    return tiny_model("llava").to("meta")  # as with an offloaded or not yet materialised model


def _load(prepare, loader=normalign.from_pretrained):
    return lambda saved, tmp_path: loader(prepare(saved, tmp_path))


def _call(fn):
    return lambda saved, tmp_path: fn()


def _non_utf8_texts(saved, tmp_path):
    from PIL import Image

    from hf_normalign.diagnostics import load_probe

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    (tmp_path / "texts.txt").write_bytes("passage é\n".encode("latin-1"))
    load_probe(tmp_path / "images", tmp_path / "texts.txt", num_samples=1)


NEWLY_HANDLED = {
    "torch.save of a patched model": (
        lambda saved, tmp_path: torch.save(normalign.patch(tiny_model("llava"), methods="moca"), tmp_path / "m.pt"),
        TypeError,
        "save_pretrained",
    ),
    "mir num_samples 2.5": (
        _call(lambda: __import__("hf_normalign").diagnostics.mir(tiny_model("llava"), None, num_samples=2.5)),
        ValueError,
        "num_samples must be an integer",
    ),
    "non-UTF-8 texts file": (_non_utf8_texts, ValueError, "is not UTF-8 text"),
    "empty method list": (_call(lambda: normalign.patch(tiny_model("llava"), methods=[])), ValueError, "empty"),
    "PRe weight NaN": (_call(lambda: PReConfig(weight=float("nan"))), ValueError, "PReConfig.weight must be a finite"),
    "target_norm inf": (
        _call(lambda: ProjectorNormConfig(target_norm=float("inf"))),
        ValueError,
        "ProjectorNormConfig.target_norm must be a finite number > 0",
    ),
    "eps negative": (_call(lambda: ProjectorNormConfig(eps=-1.0)), ValueError, "ProjectorNormConfig.eps"),
    "gwc_floor zero": (_call(lambda: ProjectorNormConfig(gwc_floor=0)), ValueError, "gwc_floor must be a finite"),
    "layers as a string": (_call(lambda: MoCaConfig(layers="01")), TypeError, "MoCaConfig.layers must be a non-empty"),
    "layers empty": (_call(lambda: MoCaConfig(layers=[])), TypeError, "non-empty list"),
    "layer bool": (_call(lambda: MoCaConfig(layers=[True])), TypeError, "got True (bool)"),
    "layer negative": (_call(lambda: MoCaConfig(layers=[-1])), ValueError, "an int >= 0"),
    "PRe layer float": (_call(lambda: PReConfig(layer=1.5)), TypeError, "PReConfig.layer must be an int"),
    "PRe head width 0": (_call(lambda: PReConfig(head_hidden_size=0)), ValueError, "head_hidden_size must be"),
    "init_std NaN": (_call(lambda: MoCaConfig(init_std=math.nan)), ValueError, "MoCaConfig.init_std"),
    "gwc 'no' in from_dict": (
        _call(lambda: NormAlignConfig.from_dict({"projector_norm": {"gwc": "no"}})),
        TypeError,
        "ProjectorNormConfig.gwc must be true or false, got 'no'",
    ),
    "weight 'abc' in from_dict": (
        _call(lambda: PReConfig.from_dict({"weight": "abc"})),
        TypeError,
        "PReConfig.weight must be a finite number >= 0, got 'abc'",
    ),
    "deepstack 1": (_call(lambda: ProjectorNormConfig(deepstack=1)), TypeError, "deepstack must be true or false"),
    "from_dict of a list": (_call(lambda: NormAlignConfig.from_dict(["moca"])), TypeError, "takes a dict"),
    "method config a string": (_call(lambda: NormAlignConfig(moca="yes")), TypeError, "NormAlignConfig.moca must be"),
    "flipped bytes": (_load(_flip_bytes), CheckpointError, "does not match the SHA-256"),
    "truncated weights": (_load(_truncate), CheckpointError, "does not match the SHA-256"),
    "swapped weights": (_load(_swap), CheckpointError, "does not match the SHA-256"),
    "flipped bytes via transformers": (
        _load(_flip_bytes, AutoModelForImageTextToText.from_pretrained),
        CheckpointError,
        "normalign.safetensors does not match the SHA-256",
    ),
    "non-finite weights": (_load(_non_finite), CheckpointError, "non-finite values (NaN or inf)"),
    "config.json missing": (_load(_no_config_json), CheckpointError, "config.json could not be resolved"),
    "config.json of another size": (_load(_wider_config_json), CheckpointError, "hidden size 4096"),
    "gwc 'no' in a checkpoint": (_load(_gwc_no), CheckpointError, "gwc must be true or false"),
    "non-UTF-8 normalign_config.json": (_load(_latin1_config), CheckpointError, "not valid UTF-8 JSON"),
    "patch a repo id": (
        _call(lambda: normalign.patch("llava-hf/llava-1.5-7b-hf", methods="moca")),
        TypeError,
        "loaded",
    ),
    "patch None": (_call(lambda: normalign.patch(None, methods="moca")), TypeError, "patch() takes a loaded model"),
    "meta device with projector_norm": (
        _call(lambda: normalign.patch(_meta_model(), methods="projector_norm")),
        ValueError,
        "meta device",
    ),
    "adapter whose base is gone": (
        lambda saved, tmp_path: normalign.from_pretrained(saved / "adapter"),
        CheckpointError,
        "names the base model '/gone/base'",
    ),
}

ALREADY_HANDLED = {
    "unknown method": (_call(lambda: NormAlignConfig.from_methods(["nope"])), ValueError, "Unknown method"),
    "unknown override": (
        _call(lambda: NormAlignConfig.from_methods("moca", nope=1)),
        ValueError,
        "Unknown override",
    ),
    "unknown config key": (_call(lambda: MoCaConfig.from_dict({"layer": 1})), ValueError, "unknown keys ['layer']"),
    "unknown method key": (_call(lambda: NormAlignConfig.from_dict({"mocha": True})), ValueError, "unknown methods"),
    "PRe anchor": (_call(lambda: PReConfig(anchor="output")), ValueError, "PReConfig.anchor must be one of"),
    "init_std negative": (_call(lambda: MoCaConfig(init_std=-1)), ValueError, "init_std"),
    "PRe weight negative": (_call(lambda: PReConfig(weight=-1)), ValueError, "PReConfig.weight"),
    "config and methods": (
        _call(lambda: normalign.patch(tiny_model("llava"), NormAlignConfig(moca=True), methods="moca")),
        ValueError,
        "not both",
    ),
    "nothing to patch": (_call(lambda: normalign.patch(tiny_model("llava"))), ValueError, "Nothing to patch"),
    "empty NormAlignConfig": (
        _call(lambda: normalign.patch(tiny_model("llava"), NormAlignConfig())),
        ValueError,
        "enables no method",
    ),
    "MoCa layer out of range": (
        _call(lambda: normalign.patch(tiny_model("llava"), moca=MoCaConfig(layers=[9]))),
        ValueError,
        "MoCaConfig.layers names layers [9]",
    ),
    "PRe layer out of range": (
        _call(lambda: normalign.patch(tiny_model("llava"), pre=PReConfig(layer=9))),
        ValueError,
        "PReConfig.layer=9 is out of range",
    ),
    "patched differently": (
        _call(lambda: normalign.patch(normalign.patch(tiny_model("llava"), methods="moca"), methods="pre")),
        ValueError,
        "already patched",
    ),
    "save an unpatched model": (
        lambda saved, tmp_path: normalign.save_pretrained(tiny_model("llava"), tmp_path / "x"),
        ValueError,
        "not patched by hf-normalign",
    ),
    "adapter options without adapter_only": (
        lambda saved, tmp_path: normalign.save_pretrained(
            normalign.patch(tiny_model("llava"), methods="moca"), tmp_path / "x", include=("projector",)
        ),
        ValueError,
        "pass adapter_only=True",
    ),
    "plain checkpoint": (_load(_plain), CheckpointError, "holds no normalign_config.json"),
    "plain checkpoint, auto class": (
        _load(_plain, normalign.AutoNormAlignModelForImageTextToText.from_pretrained),
        ValueError,
        "normalign_config=",
    ),
    "checkpoint enabling no method": (_load(_no_method), CheckpointError, "enables no method"),
    "future format": (_load(_future_format), CheckpointError, "Upgrade"),
    "weights file missing": (_load(_no_weights), CheckpointError, "normalign.safetensors could not be resolved"),
    "AutoNormAlign instantiated": (
        _call(normalign.AutoNormAlignModelForImageTextToText),
        OSError,
        "is not instantiated",
    ),
    "push a missing folder": (
        lambda saved, tmp_path: normalign.push_to_hub(tmp_path / "missing", "me/x"),
        ValueError,
        "is not a local directory",
    ),
    "push a plain folder": (
        lambda saved, tmp_path: normalign.push_to_hub(_plain(saved, tmp_path), "me/x"),
        CheckpointError,
        "holds no normalign_config.json",
    ),
    "base_model for a full checkpoint": (
        lambda saved, tmp_path: normalign.from_pretrained(saved / "ckpt", base_model=tiny_model("llava")),
        ValueError,
        "base_model= applies to adapter-only",
    ),
}

CATALOGUE = {**NEWLY_HANDLED, **ALREADY_HANDLED}


@pytest.mark.parametrize("case", CATALOGUE, ids=list(CATALOGUE))
def test_bad_input_raises_a_clear_error(case, saved, tmp_path):
    action, error, phrase = CATALOGUE[case]
    with pytest.raises(error) as raised:
        action(saved, tmp_path)
    assert phrase in str(raised.value), str(raised.value)


def test_loading_an_intact_checkpoint_still_works(saved):
    """The fixtures are valid: every load failure above comes from the damage each case applies."""
    assert normalign.get_config(normalign.from_pretrained(saved / "ckpt")).methods == ["projector_norm", "moca", "pre"]


# --- issues 22 / 25: texts files (probe passages, LLaVA JSON / JSONL) name the file and the line -----------------


def _probe_texts(tmp_path, name, content: bytes):
    from PIL import Image

    from hf_normalign.diagnostics import load_probe

    (tmp_path / "images").mkdir(exist_ok=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / name).write_bytes(content)
    return load_probe(tmp_path / "images", tmp_path / name, num_samples=None)


TEXTS_FILES = {
    "a .txt file not UTF-8 on line 3": ("t.txt", b"one\ntwo\nthr\xe9e\n", "t.txt, line 3 is not UTF-8 text"),
    "a .jsonl file not UTF-8 on line 2": (
        "t.jsonl",
        b'{"text": "one"}\n{"text": "tw\xe9"}\n',
        "t.jsonl, line 2 is not UTF-8 text",
    ),
    "a malformed .jsonl line": ("t.jsonl", b'{"text": "one"}\n\n{"text": "two"\n', "t.jsonl, line 3: not valid JSON"),
    "a .jsonl line without text": (
        "t.jsonl",
        b'{"text": "one"}\n{"txt": "two"}\n',
        "t.jsonl, line 2: expected an object with a \"text\" string, got keys ['txt']",
    ),
    "a .jsonl line that is not an object": ("t.jsonl", b'"one"\n', "t.jsonl, line 1: expected an object"),
    "a null text": ("t.jsonl", b'{"text": null}\n', 't.jsonl, line 1: "text" must be a non-empty string, got null'),
    "a number for text": ("t.jsonl", b'{"text": 5}\n', '"text" must be a non-empty string, got a int'),
    "an empty text": ("t.jsonl", b'{"text": " "}\n', "\"text\" must be a non-empty string, got ' '"),
}


@pytest.mark.parametrize("case", TEXTS_FILES, ids=list(TEXTS_FILES))
def test_a_bad_texts_file_names_the_file_and_line(case, tmp_path):
    name, content, phrase = TEXTS_FILES[case]
    with pytest.raises(ValueError) as raised:
        _probe_texts(tmp_path, name, content)
    assert str(tmp_path / name) in str(raised.value) and phrase in str(raised.value), str(raised.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [("t.txt", "first\nsecond\nthird\n"), ("t.jsonl", '{"text": "first"}\n{"text": "second"}\n{"text": "third"}\n')],
)
def test_a_byte_order_mark_is_not_part_of_the_first_passage(name, content, tmp_path):
    probe = _probe_texts(tmp_path, name, b"\xef\xbb\xbf" + content.encode())
    assert [sample.text for sample in probe] == ["first", "second", "third"]


def test_texts_given_as_a_list_must_be_strings(tmp_path):
    from PIL import Image

    from hf_normalign.diagnostics import load_probe

    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in images:
        Image.new("RGB", (16, 16)).save(path)
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType, not a string"):
        load_probe(images, ["a passage", None], num_samples=None)


def test_llava_jsonl_errors_name_the_line_and_a_bom_is_dropped(tmp_path):
    from hf_normalign.data import LlavaJsonDataset

    row = {"id": "0", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    good = json.dumps(row)
    (tmp_path / "bad.jsonl").write_text(f"{good}\n{good}\n{good[:-1]}\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: not valid JSON"):
        LlavaJsonDataset(tmp_path / "bad.jsonl", verify_images=False)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + f"{good}\n".encode())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + f"[{good}]".encode())
    for name in ("bom.jsonl", "bom.json"):
        assert len(LlavaJsonDataset(tmp_path / name, verify_images=False)) == 1
