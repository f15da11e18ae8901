"""The vLLM plugin without vLLM: checkpoint reader (config, SHA-256, refusals), file-path sources, fused MoCa."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

import hf_normalign as normalign
from hf_normalign.testing import tiny_model
from normalign_vllm import checkpoint as ckpt
from normalign_vllm import core
from normalign_vllm.serving_modules import NormAlignServingModules


@pytest.fixture
def aligned(tmp_path):
    model = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca"])
    normalign.save_pretrained(model, tmp_path)
    return tmp_path, model.normalign


def _edit_config(folder, **changes):
    path = os.path.join(folder, ckpt.CONFIG_NAME)
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


def _expected(plugin) -> dict[str, torch.Tensor]:
    return {k: v for k, v in plugin.state_dict().items() if not k.startswith("pre_head.")}


def test_reads_the_saved_plugin_weights(aligned):
    folder, plugin = aligned
    found = ckpt.find(str(folder))
    assert found.moca_layers == [0, 1] and found.hidden_size == 64
    tensors = ckpt.read_weights(found, _expected(plugin))
    for key, value in _expected(plugin).items():
        assert torch.equal(tensors[key], value)


def test_folder_without_config_is_plain(tmp_path):
    tiny_model("llava").save_pretrained(tmp_path)
    assert ckpt.find(str(tmp_path)) is None


def test_sha256_is_verified_when_recorded(aligned):
    folder, plugin = aligned
    with open(folder / ckpt.WEIGHTS_NAME, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    _edit_config(folder, sha256={ckpt.WEIGHTS_NAME: digest})
    ckpt.read_weights(ckpt.find(str(folder)), _expected(plugin))  # the right digest passes
    _edit_config(folder, sha256={ckpt.WEIGHTS_NAME: "0" * 64})
    with pytest.raises(ckpt.NormAlignServingError, match="SHA-256"):
        ckpt.read_weights(ckpt.find(str(folder)), _expected(plugin))


def test_adapter_only_checkpoint_is_refused(aligned):
    folder, _ = aligned
    _edit_config(folder, adapter_only=True)
    with pytest.raises(ckpt.NormAlignServingError, match="adapter-only"):
        ckpt.find(str(folder))


def test_every_source_loads():
    # The plugin loads these hf_normalign files by path: a move or a rename must fail here, in the main suite.
    for name, (_, attributes) in core.SOURCES.items():
        for attribute in attributes:
            assert core.get(name, attribute) is not None


def test_the_checkpoint_format_is_hf_normalign_s_own_file(aligned):
    # Issue 24: the serving reader loads persistence/format.py itself (names, checks, checksum), no copies.
    from hf_normalign.persistence import format as persistence_format

    assert core.load("format").__file__ == persistence_format.__file__
    assert (ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME) == (persistence_format.CONFIG_NAME, persistence_format.WEIGHTS_NAME)
    folder, _ = aligned
    weights = os.path.join(folder, ckpt.WEIGHTS_NAME)
    with open(weights, "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()
    assert core.get("format", "file_sha256")(weights) == expected == ckpt.find(str(folder)).sha256


def test_a_moved_source_is_named_in_the_error(monkeypatch):
    monkeypatch.setitem(core.SOURCES, "moved", ("methods/gone.py", ("MoCaLayer",)))
    with pytest.raises(core.SourceMovedError, match=r"methods/gone\.py, which does not exist: update SOURCES"):
        core.get("moved", "MoCaLayer")
    with pytest.raises(core.SourceMovedError, match="has no 'NoSuchClass'"):
        monkeypatch.setitem(core.SOURCES, "moca", ("methods/moca.py", ("NoSuchClass",)))
        core.get("moca", "NoSuchClass")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moca_hook_matches_the_formula(aligned, dtype):
    # Served MoCa: h + mask * ((u - 1) h + v) on a flattened [tokens, D] step; reference u * h + v in float64 at
    # vision rows, the input itself (bit for bit) at text rows and at the padded tail of the fixed mask buffer.
    folder, plugin = aligned
    checkpoint = ckpt.find(str(folder))
    modules = NormAlignServingModules(checkpoint, max_num_tokens=16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in plugin.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    modules.load_state_dict(_expected(plugin), strict=True)
    modules.prepare(dtype)
    modules.record_vision_positions(16, torch.zeros(16, dtype=torch.bool))  # a previous step's mask is cleared
    is_vision = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    modules.record_vision_positions(10, is_vision)
    hidden = torch.randn(10, 64, generator=generator).to(dtype)
    layer = plugin.moca["layer_1_norm"]
    out = modules.calibrate_hook("layer_1_norm")(None, (), (hidden, "kept"))
    assert out[1] == "kept" and out[0].dtype == dtype
    expected = hidden.double() * layer.scale.double() + layer.shift.double()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out[0][is_vision].double(), expected[is_vision], rtol=tolerance, atol=tolerance)
    assert torch.equal(out[0][~is_vision], hidden[~is_vision])
    assert not torch.equal(out[0][is_vision], hidden[is_vision])
