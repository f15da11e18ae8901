"""The vLLM plugin's checkpoint reader (runs without vLLM): config parsing, SHA-256 check, refusals."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

import hf_normalign as normalign
from hf_normalign.testing import tiny_model
from normalign_vllm import checkpoint as ckpt


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
