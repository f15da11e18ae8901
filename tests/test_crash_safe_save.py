"""Issue 12: a save killed (SIGKILL) between any two of its file operations loses nothing.

The save's own file operations are hook points (``persistence.staging._on_file_operation``). A forked child saves a
retrained model over a checkpoint folder that also holds a processor, a tokenizer, trainer state and a notes
file, and kills itself before operation k, for every k. After each kill a load must give the old logits (killed
before the commit) or refuse the half-applied folder (after), changing nothing; after `recover` the folder must load
with the old or the new logits, hold every user file byte for byte, and the next save must leave no hidden folder
behind.
"""

import os
import shutil
import signal

import pytest
import torch

import hf_normalign as normalign
from hf_normalign import persistence
from hf_normalign.persistence import staging
from hf_normalign.persistence.format import PLUGIN_FILES
from hf_normalign.testing import tiny_batch, tiny_model, tiny_processor

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill test forks")

NO_KILL = 10_000


def train_one_step(model) -> None:
    model.train()
    model(**tiny_batch(model, seed=1)).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.grad is not None], lr=0.5).step()
    model.zero_grad(set_to_none=True)
    model.eval()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def save_in_child(model, target, kill_at: int) -> list[str]:
    """Save in a forked child killed before file operation ``kill_at``; returns the operations it started."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        seen = 0

        def hook(operation: str, path: str) -> None:
            nonlocal seen
            if seen == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            os.write(write, f"{operation} {os.path.basename(path)}\n".encode())
            seen += 1

        staging._on_file_operation = hook
        try:
            model.save_pretrained(target)
            os._exit(0)
        except BaseException:
            os._exit(3)
    os.close(write)
    with os.fdopen(read) as f:
        operations = f.read().splitlines()
    _, status = os.waitpid(pid, 0)
    expected = signal.SIGKILL if kill_at < NO_KILL else None
    assert (os.WTERMSIG(status) if os.WIFSIGNALED(status) else None) == expected, (kill_at, status)
    if expected is None:
        assert os.WEXITSTATUS(status) == 0
    return operations


def user_files(folder) -> dict[str, bytes]:
    own = {"config.json", "generation_config.json", "model.safetensors"} | set(PLUGIN_FILES)
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if name not in own}


def tree(folder) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path, with its content."""
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def hidden(folder) -> list[str]:
    """Hidden entries, but for the writer lock's file (it stays beside the folder, empty)."""
    return sorted(name for name in os.listdir(folder) if name.startswith(".") and not name.endswith("normalign-lock"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint folder with user files, and the model retrained one step (old and new logits differ)."""
    pristine = tmp_path_factory.mktemp("pristine") / "ckpt"
    model = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca", "pre"])
    train_one_step(model)
    batch = tiny_batch(model, with_labels=False)
    model.save_pretrained(pristine)
    tiny_processor("llava").save_pretrained(pristine)  # processor and tokenizer files
    (pristine / "notes.md").write_text("the user's own notes\n")
    (pristine / "trainer_state.json").write_text('{"global_step": 7}\n')
    old = logits(model, batch)
    train_one_step(model)
    new = logits(model, batch)
    assert not torch.equal(old, new)
    return model, batch, pristine, old, new


def test_kill_at_every_file_operation_of_a_save(setup, tmp_path):
    model, batch, pristine, old, new = setup
    expected_user_files = user_files(pristine)
    assert {"notes.md", "trainer_state.json", "processor_config.json", "tokenizer.json"} <= set(expected_user_files)

    operations = save_in_child(model, shutil.copytree(pristine, tmp_path / "count" / "ckpt"), NO_KILL)
    commit = operations.index(f"replace {persistence.COMMIT_NAME}.tmp")  # the atomic rename of the commit marker
    assert len(operations) > commit + 5  # the moves, removals and clean-up come after it, each a kill point
    finished = operations.index(f"remove {persistence.COMMIT_NAME}")  # the roll-forward is done once this ran

    for kill_at in range(len(operations)):
        parent = tmp_path / f"kill{kill_at}"
        target = shutil.copytree(pristine, parent / "ckpt")
        save_in_child(model, target, kill_at)

        assert user_files(target) == expected_user_files, operations[kill_at]  # before any recovery, too
        before_load = tree(parent)
        if kill_at <= commit or kill_at > finished:  # one whole checkpoint: a load ignores the leftover staging folder
            expected = old if kill_at <= commit else new
            assert torch.equal(logits(normalign.from_pretrained(target), batch), expected), operations[kill_at]
        else:  # committed, partly rolled forward: a load reports it and changes nothing
            with pytest.raises(normalign.NormAlignCheckpointError, match=r"interrupted after its commit.*recover"):
                normalign.from_pretrained(target)
        assert tree(parent) == before_load, operations[kill_at]  # loading never moves or deletes anything
        normalign.persistence.recover(target)  # finishes or removes the interrupted save
        loaded = normalign.from_pretrained(target)
        assert torch.equal(logits(loaded, batch), new if kill_at > commit else old), operations[kill_at]
        assert hidden(parent) == [] and hidden(target) == []
        assert user_files(target) == expected_user_files

        save_in_child(model, target, kill_at)  # killed again at the same point, then a save goes through
        model.save_pretrained(target)
        assert hidden(parent) == [] and hidden(target) == [], operations[kill_at]
        assert user_files(target) == expected_user_files
        assert torch.equal(logits(normalign.from_pretrained(target), batch), new)


def test_uncommitted_leftover_is_removed_with_a_warning_and_user_files_stay(setup, tmp_path, caplog):
    model, batch, pristine, old, _ = setup
    target = shutil.copytree(pristine, tmp_path / "ckpt")
    operations = save_in_child(model, target, NO_KILL)
    staging_written = operations.index("write normalign_config.json")
    shutil.rmtree(target)
    target = shutil.copytree(pristine, tmp_path / "ckpt")
    save_in_child(model, target, staging_written)  # killed with the staging folder half written
    assert len(hidden(tmp_path)) == 1
    normalign.persistence.recover(target)
    assert hidden(tmp_path) == []
    assert "interrupted save" in caplog.text
    assert torch.equal(logits(normalign.from_pretrained(target), batch), old)


def test_a_single_file_is_replaced_whole(tmp_path, monkeypatch, capsys):
    """`normalign mir --json` (and the reports, through the same helper): a write that fails before its rename
    leaves the previous file as it was; the next one replaces it and leaves nothing beside it."""
    from hf_normalign.cli import main

    model = tmp_path / "m"
    tiny_model("llava").save_pretrained(model)
    tiny_processor("llava").save_pretrained(model)
    out = tmp_path / "mir.json"
    out.write_text("previous result\n")
    argv = ["mir", str(model), "--num-samples", "4", "--device", "cpu", "--no-progress", "--json", str(out)]

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", disk_full)
        assert main(argv) == 1
    assert out.read_text() == "previous result\n"
    assert "No space left on device" in capsys.readouterr().err

    assert main(argv) == 0
    assert out.read_text().startswith("{") and sorted(os.listdir(tmp_path)) == ["m", "mir.json"]
