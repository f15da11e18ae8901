"""The architecture registry: overriding a built-in family affects that family only, and can be undone."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_normalign as normalign
from hf_normalign.testing import tiny_batch, tiny_model


@pytest.fixture
def registry():
    """Leaves the registry as it found it, whatever the test registered or overrode."""
    before = {name: normalign.get_spec(name) for name in normalign.supported_architectures()}
    yield
    for name in normalign.supported_architectures():
        if normalign.get_spec(name) is not before.get(name):
            normalign.unregister_architecture(name)
    assert {name: normalign.get_spec(name) for name in normalign.supported_architectures()} == before


def test_override_before_the_first_lookup_leaves_the_other_families_alone():
    """The registry of a fresh process: a built-in override registered first must not hide the other built-ins."""
    script = textwrap.dedent(
        """
        import dataclasses
        import hf_normalign as normalign
        from hf_normalign.specs.llava import SPEC
        from hf_normalign.testing import tiny_model

        override = dataclasses.replace(SPEC, vision_grid="overview_tile")
        normalign.register_architecture(override, overwrite=True)  # nothing looked up before this line
        for family in ("qwen2_vl", "smolvlm", "llava_next"):
            normalign.patch(tiny_model(family), methods="moca")
        assert normalign.get_spec("llava") is override
        print(len(normalign.supported_architectures()))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from hf_normalign.specs import SPECS

    assert int(done.stdout.split()[-1]) == len(SPECS)


def test_override_then_unregister_restores_the_builtin(registry):
    builtin = normalign.get_spec("llava")
    moved = dataclasses.replace(builtin, projector="model.mm_projector")
    with pytest.raises(ValueError, match="overwrite=True"):
        normalign.register_architecture(moved)
    normalign.register_architecture(moved, overwrite=True)
    assert normalign.get_spec("llava") is moved and normalign.get_spec("qwen2_vl").model_type == "qwen2_vl"
    with pytest.raises(ValueError, match="model.mm_projector"):  # the override is in force for llava
        normalign.patch(tiny_model("llava"), methods="moca")
    normalign.patch(tiny_model("qwen2_vl"), methods="moca")  # and for llava only

    assert normalign.unregister_architecture("llava") is moved
    assert normalign.get_spec("llava") is builtin
    model = tiny_model("llava")
    batch = tiny_batch(model)
    with torch.no_grad():
        reference = model(**batch).logits
        normalign.patch(model, methods="moca")  # identity init: the restored spec patches as before
        assert torch.equal(model(**batch).logits, reference)


def test_unregister_a_new_family_and_the_errors(registry):
    spec = normalign.ArchitectureSpec(
        model_type="my_llava_like",
        projector="model.multi_modal_projector",
        language_model="model.language_model",
        vision_tower="model.vision_tower",
    )
    normalign.register_architecture(spec)
    assert "my_llava_like" in normalign.supported_architectures()
    assert normalign.unregister_architecture("my_llava_like") is spec
    assert "my_llava_like" not in normalign.supported_architectures()
    with pytest.raises(ValueError, match="No architecture is registered for model_type 'my_llava_like'"):
        normalign.unregister_architecture("my_llava_like")
    with pytest.raises(ValueError, match="'llava' is a built-in family"):
        normalign.unregister_architecture("llava")  # nothing to undo: the shipped spec stays
    assert normalign.get_spec("llava").model_type == "llava"
