"""Issue 22 (persistence) and the persistence cases of issue 25: a checkpoint folder is data, never instructions.

Hostile folders are built by hand: leftover staging plans naming absolute paths, '..', symlinked sub-folders and
symlinked files, and damaged commit markers. Loading, `recover` and a save must act on none of them, and no file
outside the folder (nor in it) may change: the whole surrounding tree is hashed before and after. Then: readers
and writers in separate processes, a save that leaves exactly the new checkpoint, and strict types in every file.
"""

import hashlib
import json
import os
import shutil

import pytest
import safetensors.torch
import torch

import hf_normalign as normalign
from hf_normalign.persistence import COMMIT_NAME
from hf_normalign.persistence.format import file_sha256
from hf_normalign.testing import tiny_model
from normalign_vllm import checkpoint as serving

CheckpointError = normalign.NormAlignCheckpointError

STAGING = ".ckpt.normalign-staging-0123abcd"

LOCK = ".ckpt.normalign-lock"

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the concurrency tests fork")


def tree(root) -> dict[str, str]:
    """Every entry under ``root`` (links not followed): a file's SHA-256, a link's target, a folder's name."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root)
            if os.path.islink(path):
                found[key] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    found[key] = hashlib.sha256(f.read()).hexdigest()
            else:
                found[key] = "dir"
    return found


def without_lock(entries: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in entries.items() if key != LOCK}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    model = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca"])
    model.save_pretrained(root / "ckpt")
    return root / "ckpt", model


@pytest.fixture
def workspace(saved, tmp_path):
    """tmp_path/ckpt (a checkpoint), tmp_path/outside/victim.txt and tmp_path/outside/sub/, which nothing may touch."""
    shutil.copytree(saved[0], tmp_path / "ckpt")
    (tmp_path / "outside" / "sub").mkdir(parents=True)
    (tmp_path / "outside" / "victim.txt").write_text("precious\n")
    (tmp_path / "outside" / "sub" / "config.json").write_text("precious too\n")
    return tmp_path


def _plan(root, moves, removes, files=()):
    staging = root / STAGING
    staging.mkdir()
    for name in files:
        (staging / name).write_text("hostile\n")
    (staging / COMMIT_NAME).write_text(json.dumps({"moves": moves, "removes": removes}))
    return staging


def absolute_remove(root):
    _plan(root, [], [str(root / "outside" / "victim.txt")])


def dotdot_remove(root):
    _plan(root, [], ["../outside/victim.txt"])


def dotdot_move(root):
    _plan(root, ["../outside/victim.txt"], [])


def move_through_symlinked_folder(root):
    (root / "ckpt" / "sub").symlink_to(root / "outside" / "sub")
    staging = _plan(root, ["sub/config.json"], [])
    (staging / "sub").mkdir()
    (staging / "sub" / "config.json").write_text("hostile\n")


def move_over_symlinked_file(root):
    os.remove(root / "ckpt" / "config.json")
    (root / "ckpt" / "config.json").symlink_to(root / "outside" / "victim.txt")
    _plan(root, ["config.json"], [], files=["config.json"])


def remove_symlinked_file(root):
    (root / "ckpt" / "notes.md").symlink_to(root / "outside" / "victim.txt")
    _plan(root, [], ["notes.md"])


def move_a_symlink_in(root):
    staging = _plan(root, ["config.json"], [])
    (staging / "config.json").symlink_to(root / "outside" / "victim.txt")


def staging_is_a_symlink(root):
    (root / STAGING).symlink_to(root / "outside")


def damaged_marker(root):
    staging = _plan(root, [], [])
    (staging / COMMIT_NAME).write_bytes(b'{"moves": ["config.json"], "rem\xff')


def marker_of_another_shape(root):
    staging = _plan(root, [], [])
    (staging / COMMIT_NAME).write_text(json.dumps({"moves": "config.json", "removes": [], "run": "rm -rf /"}))


def unlisted_file_in_staging(root):
    _plan(root, [], [], files=["model.safetensors"])


def uncommitted_with_a_symlink(root):
    (root / STAGING).mkdir()
    (root / STAGING / "victim.txt").symlink_to(root / "outside" / "victim.txt")


HOSTILE = [
    absolute_remove,
    dotdot_remove,
    dotdot_move,
    move_through_symlinked_folder,
    move_over_symlinked_file,
    remove_symlinked_file,
    move_a_symlink_in,
    staging_is_a_symlink,
    damaged_marker,
    marker_of_another_shape,
    unlisted_file_in_staging,
    uncommitted_with_a_symlink,
]


@pytest.mark.parametrize("build", HOSTILE, ids=lambda f: f.__name__)
def test_a_hostile_plan_is_reported_and_never_executed(build, workspace, saved):
    build(workspace)
    target = workspace / "ckpt"
    before = tree(workspace)

    try:  # loading: the old checkpoint, or an error naming the folder; never a change
        normalign.from_pretrained(target)
    except CheckpointError as err:
        assert str(target) in str(err) and "recover" in str(err)
    assert tree(workspace) == before

    with pytest.raises(CheckpointError, match=r"not a staging folder hf-normalign can act on.*Nothing was moved"):
        normalign.persistence.recover(target)
    assert without_lock(tree(workspace)) == before

    with pytest.raises(CheckpointError, match=r"not a staging folder hf-normalign can act on") as err:
        saved[1].save_pretrained(target)  # every save recovers first: it refuses too, and writes nothing
    assert STAGING in str(err.value)
    assert without_lock(tree(workspace)) == before


def test_loading_reports_an_interrupted_save_and_leaves_it_to_the_next_save(workspace, saved):
    """A genuine committed plan (the kill test covers every kill point): a load refuses it, a save finishes it."""
    target = workspace / "ckpt"
    new = normalign.patch(tiny_model("llava", seed=3), methods=["projector_norm", "moca"])
    new.save_pretrained(workspace / "new")
    staging = workspace / STAGING
    shutil.copytree(workspace / "new", staging)
    moves = sorted(os.listdir(staging))
    (staging / COMMIT_NAME).write_text(json.dumps({"moves": moves, "removes": []}))
    os.replace(staging / "model.safetensors", target / "model.safetensors")  # killed after the first move
    before = tree(workspace)
    with pytest.raises(CheckpointError, match=r"interrupted after its commit.*persistence\.recover"):
        normalign.read_checkpoint_info(target)
    with pytest.raises(CheckpointError, match=r"interrupted after its commit"):
        normalign.from_pretrained(target)
    assert tree(workspace) == before
    normalign.persistence.recover(target)
    loaded = normalign.from_pretrained(target)
    for key, value in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not staging.exists()


# --- concurrency: separate processes ------------------------------------------------------------------------------


def _model_for(value: float):
    """A patched tiny model whose plugin and lm_head are all ``value``: a load mixing two saves shows."""
    model = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca"])
    with torch.no_grad():
        for tensor in [*model.normalign.parameters(), model.lm_head.weight]:
            tensor.fill_(value)
    return model


def _values(model) -> set[float]:
    """The distinct values of the plugin's and lm_head's entries (one value: the tensors come from one save)."""
    tensors = [*model.normalign.parameters(), model.lm_head.weight]
    return {float(value) for t in tensors for value in t.detach().unique()}


def _fork(work) -> tuple[int, int]:
    """Run ``work(write)`` in a forked child; returns (pid, read end of its report pipe)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            work(write)
            os._exit(0)
        except BaseException as err:  # the parent sees the message
            os.write(write, f"CRASH {type(err).__name__}: {err}\n".encode())
            os._exit(3)
    os.close(write)
    return pid, read


def _collect(pid: int, read: int) -> list[str]:
    with os.fdopen(read) as f:
        lines = f.read().splitlines()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, lines[-3:]
    return lines


def _writer(target, values, refusals_allowed: bool):
    def work(write):
        models = [(value, _model_for(value)) for value in values]
        for value, model in models:
            try:
                model.save_pretrained(target)
            except TimeoutError as err:
                assert refusals_allowed and "Another process has been saving into" in str(err), err
                os.write(write, f"refused {value}\n".encode())
            else:
                os.write(write, f"saved {value}\n".encode())

    return work


def _check_final(target, saved_values: set[float]) -> None:
    loaded = normalign.from_pretrained(target)
    values = _values(loaded)
    assert len(values) == 1 and values <= saved_values, values  # exactly one complete save
    reference = _model_for(values.pop()).state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_a_reader_polling_never_breaks_a_writer_and_reads_whole_saves(tmp_path):
    target = tmp_path / "ckpt"
    _model_for(0.0).save_pretrained(target)
    values = [float(i) for i in range(1, 21)]
    pid, read = _fork(_writer(target, values, refusals_allowed=False))
    reads, refused, status = [], 0, None
    while status is None:
        reaped, code = os.waitpid(pid, os.WNOHANG)
        if reaped:  # the writer is done: this is the last round of reads
            status = code
        try:
            info = normalign.read_checkpoint_info(target)
            assert info.config.methods == ["projector_norm", "moca"]
            reads.append(_values(normalign.from_pretrained(target)))
        except CheckpointError as err:  # a clean refusal: the folder changed under the read every time
            assert "changed while it was read" in str(err), err
            refused += 1
    with os.fdopen(read) as f:
        report = f.read().splitlines()
    assert report == [f"saved {v}" for v in values] and status == 0  # 20 of 20 saves complete
    assert all(len(r) == 1 for r in reads), reads  # every load came from one save
    assert reads, "the reader never got a load through"
    _check_final(target, {values[-1]})


@pytest.mark.parametrize("timeout", ["600", "0"], ids=["waits", "fails-fast"])
def test_two_writers_are_serialised_or_cleanly_refused(tmp_path, monkeypatch, timeout):
    monkeypatch.setenv("HF_NORMALIGN_LOCK_TIMEOUT", timeout)
    target = tmp_path / "ckpt"
    first = [float(i) for i in range(1, 7)]
    second = [float(i) for i in range(101, 107)]
    children = [_fork(_writer(target, values, refusals_allowed=timeout == "0")) for values in (first, second)]
    reports = [_collect(pid, read) for pid, read in children]
    outcomes = [line.split() for report in reports for line in report]
    assert all(kind in ("saved", "refused") for kind, _ in outcomes)
    assert len(outcomes) == len(first) + len(second)  # every save either completed or was refused
    completed = {float(value) for kind, value in outcomes if kind == "saved"}
    if timeout == "600":
        assert completed == set(first + second)
    _check_final(target, completed)
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith(".")) == [LOCK]  # no staging folder left


# --- a save leaves exactly the new checkpoint ----------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [(None, "60KB"), ("60KB", None), ("60KB", "150KB")])
def test_a_save_removes_the_base_files_of_an_earlier_layout(tmp_path, first, second):
    target = tmp_path / "ckpt"
    old = normalign.patch(tiny_model("llava"), methods=["moca"])
    old.save_pretrained(target, **({"max_shard_size": first} if first else {}))
    (target / "notes.md").write_text("mine\n")
    new = normalign.patch(tiny_model("llava", seed=5), methods=["moca"])
    new.save_pretrained(tmp_path / "reference", **({"max_shard_size": second} if second else {}))
    new.save_pretrained(target, **({"max_shard_size": second} if second else {}))

    assert sorted(os.listdir(target)) == sorted([*os.listdir(tmp_path / "reference"), "notes.md"])
    assert any("-of-" in name for name in os.listdir(target)) == (second is not None)
    loaded = normalign.from_pretrained(target)
    for key, value in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_an_adapter_save_does_not_silently_turn_a_fine_tune_into_an_adapter(workspace, saved):
    target = workspace / "ckpt"
    before = tree(workspace)
    with pytest.raises(ValueError, match=r"holds a full model checkpoint \(config\.json, model\.safetensors\)"):
        normalign.save_pretrained(saved[1], target, adapter_only=True, base_model_name_or_path="org/base")
    assert without_lock(tree(workspace)) == before
    normalign.save_pretrained(saved[1], workspace / "adapter", adapter_only=True, base_model_name_or_path="org/base")


def test_an_adapter_on_a_base_of_another_family(tmp_path):
    tiny_model("qwen2_vl").save_pretrained(tmp_path / "qwen")
    adapter = normalign.patch(tiny_model("llava"), methods="moca")
    normalign.save_pretrained(
        adapter, tmp_path / "adapter", adapter_only=True, base_model_name_or_path=str(tmp_path / "qwen")
    )
    with pytest.raises(CheckpointError, match=r"made for a 'llava' model.*is a 'qwen2_vl' model.*base_model="):
        normalign.from_pretrained(tmp_path / "adapter")


# --- strict types --------------------------------------------------------------------------------------------------


def _edit(data, **changes):
    return {**data, **changes}


STRICT = {
    "adapter_only string": (dict(adapter_only="false"), r"'adapter_only' must be true or false, got 'false'"),
    "hidden_size string": (dict(hidden_size="64"), r"'hidden_size' must be a JSON integer >= 1, got '64'"),
    "hidden_size float": (dict(hidden_size=64.9), r"'hidden_size' must be a JSON integer"),
    "layers float": (dict(num_decoder_layers=2.5), r"'num_decoder_layers' must be a JSON integer"),
    "layers bool": (dict(num_decoder_layers=True), r"'num_decoder_layers' must be a JSON integer"),
    "type list": (dict(base_model_type=["llava"]), r"'base_model_type' must be a non-empty string"),
    "modules string": (dict(modules_to_save="model.multi_modal_projector"), r"'modules_to_save' must be a list"),
    "revision number": (dict(base_model_revision=3), r"'base_model_revision' must be a non-empty string or null"),
    "class not of the family": (dict(base_model_class="BertModel"), r"'BertModel'.*allowed: 'LlavaForConditional"),
    "sha256 removed": (dict(sha256=None), r"lacks the keys \['sha256'\]"),
    "sha256 emptied": (dict(sha256={}), r"format 2\) records no SHA-256 for \['normalign\.safetensors'\]"),
    "format as bool": (dict(format_version=True), r"unknown format_version True"),
    "method setting": (dict(methods={"moca": {"layers": [0.0]}}), r"MoCaConfig\.layers\[\.\.\.\] must be an int"),
    "layer numbering": (
        dict(methods={"pre": {"layer": 1, "layer_numbering": "1-based"}}),
        r"layer_numbering is '1-bas",
    ),
}


@pytest.mark.parametrize("case", list(STRICT))
def test_values_are_read_as_written(case, saved, tmp_path):
    changes, pattern = STRICT[case]
    ckpt = shutil.copytree(saved[0], tmp_path / "ckpt")
    data = json.loads((ckpt / "normalign_config.json").read_text())
    data = {k: v for k, v in _edit(data, **changes).items() if v is not None}
    (ckpt / "normalign_config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=pattern):
        normalign.from_pretrained(ckpt)
    if case != "class not of the family":  # the serving reader applies the same schema
        with pytest.raises(serving.NormAlignServingError, match=pattern.split("allowed")[0]):
            serving.find(str(ckpt))


def test_a_format_1_checkpoint_without_sha256_still_loads_with_a_warning(saved, tmp_path, caplog):
    ckpt = shutil.copytree(saved[0], tmp_path / "ckpt")
    data = json.loads((ckpt / "normalign_config.json").read_text())
    del data["sha256"]
    (ckpt / "normalign_config.json").write_text(json.dumps({**data, "format_version": 1}))
    loaded = normalign.from_pretrained(ckpt)
    for key, value in saved[1].normalign.state_dict().items():
        assert torch.equal(loaded.normalign.state_dict()[key], value), key
    assert "is not verified" in caplog.text and "records no SHA-256" in caplog.text


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_floating_plugin_tensors_are_refused(saved, tmp_path, dtype):
    ckpt = shutil.copytree(saved[0], tmp_path / "ckpt")
    tensors = safetensors.torch.load_file(ckpt / "normalign.safetensors")
    tensors["moca.layer_0_norm.scale"] = (tensors["moca.layer_0_norm.scale"] * 3).to(dtype)
    safetensors.torch.save_file(tensors, ckpt / "normalign.safetensors")
    data = json.loads((ckpt / "normalign_config.json").read_text())
    data["sha256"]["normalign.safetensors"] = file_sha256(str(ckpt / "normalign.safetensors"))
    (ckpt / "normalign_config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"non-floating tensors.*moca\.layer_0_norm\.scale \({dtype}\)"):
        normalign.from_pretrained(ckpt)
    with pytest.raises(serving.NormAlignServingError, match=rf"moca\.layer_0_norm\.scale \({dtype}\)"):
        serving.read_weights(serving.find(str(ckpt)), {})


def test_the_lock_timeout_setting_is_checked(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_NORMALIGN_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"HF_NORMALIGN_LOCK_TIMEOUT must be a number of seconds >= 0, got 'soon'"):
        saved[1].save_pretrained(tmp_path / "ckpt")


def test_a_save_never_replaces_a_symlinked_entry(workspace, saved):
    target = workspace / "ckpt"
    os.remove(target / "normalign.safetensors")
    (target / "normalign.safetensors").symlink_to(workspace / "outside" / "victim.txt")
    before = tree(workspace)
    with pytest.raises(CheckpointError, match=r"Cannot save into .*normalign\.safetensors resolves outside"):
        saved[1].save_pretrained(target)
    assert without_lock(tree(workspace)) == before  # the link, its target and the folder as they were
