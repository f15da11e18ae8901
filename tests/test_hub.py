"""Issue: persistence, Hub part. What `push_to_hub` would send, checked offline on a recording HfApi."""

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from huggingface_hub import CommitInfo, HfApi, RepoUrl

import hf_normalign as normalign
from hf_normalign import cli
from hf_normalign.testing import tiny_batch, tiny_model

BASE_ID = "llava-hf/llava-1.5-7b-hf"
FULL_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "normalign_config.json",
    "normalign.safetensors",
}
ADAPTER_FILES = {"README.md", "normalign_config.json", "normalign.safetensors", "normalign_modules.safetensors"}
CONFIG = normalign.NormAlignConfig(
    projector_norm=normalign.ProjectorNormConfig(gwc=False),
    moca=normalign.MoCaConfig(layers=[1]),
    pre=normalign.PReConfig(weight=0.25),
)


class RecordingApi(HfApi):
    """An HfApi that records repos, branches and commits instead of sending them (huggingface_hub only)."""

    def __init__(self) -> None:
        super().__init__(token="hf_test")
        self.repos: list[dict] = []
        self.branches: list[str] = []
        self.commits: list[dict] = []

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        self.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):
        self.branches.append(branch)

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, create_pr=None, **kwargs):
        files = {}
        for op in operations:  # read now: a temporary folder is gone once push_to_hub returns
            src = op.path_or_fileobj
            files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        self.commits.append(
            {"repo_id": repo_id, "files": files, "message": commit_message, "revision": revision, "pr": create_pr}
        )
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
            commit_message=commit_message,
            commit_description="",
            oid="0" * 40,
        )


@pytest.fixture
def api():
    return RecordingApi()


@pytest.fixture
def model():
    """A trained, patched tiny LLaVA that says it came from a Hub repo."""
    model = normalign.patch(tiny_model("llava"), CONFIG)
    model.train()
    model(**tiny_batch(model)).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    model.name_or_path = BASE_ID
    return model


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_push_model_sends_one_commit_with_the_aligned_files_and_a_card(model, api, tmp_path):
    commit = normalign.push_to_hub(model, "me/aligned", private=True, mir=3.21, api=api)

    assert api.repos == [{"repo_id": "me/aligned", "private": True, "exist_ok": True}]
    assert len(api.commits) == 1
    sent = api.commits[0]["files"]
    assert set(sent) == FULL_FILES
    assert commit.commit_url.startswith("https://huggingface.co/me/aligned/commit/")
    # What is sent is what save_pretrained writes.
    model.save_pretrained(tmp_path)
    for name in FULL_FILES - {"README.md"}:
        assert sent[name] == (tmp_path / name).read_bytes(), name
    assert not any(k.startswith("normalign.") for k in safetensors.torch.load(sent["model.safetensors"]))

    card = sent["README.md"].decode()
    meta = front_matter(card)
    assert meta["base_model"] == BASE_ID
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert meta["tags"] == ["hf-normalign", "projector-norm", "moca", "pre"]
    # Settings rendered from the checkpoint's normalign_config.json.
    assert "| Projector LayerNorm + GWC (arXiv 2512.08374) | `gwc` | `false` |" in card
    assert "| `target_norm` | measured: mean text-embedding norm |" in card
    assert "| MoCa, modality calibration (arXiv 2410.07167) | `layers` | `[1]` |" in card
    assert "| PRe, predictive regularization (arXiv 2603.20808) | `weight` | `0.25` |" in card
    assert "MIR (Modality Integration Rate, lower is better): 3.2100" in card
    assert "hidden size 64, 2 decoder layers" in card
    assert "transformers without hf-normalign loads the base model **without the intervention**" in card
    assert 'model = AutoModelForImageTextToText.from_pretrained("me/aligned")' in card
    assert f"hf-normalign {normalign.__version__}" in card


def test_push_adapter(model, api):
    normalign.push_to_hub(model, "me/adapter", adapter_only=True, api=api)
    (commit,) = api.commits
    assert set(commit["files"]) == ADAPTER_FILES
    assert json.loads(commit["files"]["normalign_config.json"])["base_model_name_or_path"] == BASE_ID
    card = commit["files"]["README.md"].decode()
    meta = front_matter(card)
    assert (meta["base_model"], meta["library_name"]) == (BASE_ID, "hf-normalign")
    assert "transformers without hf-normalign cannot load it" in card
    assert 'model = normalign.from_pretrained("me/adapter")' in card
    assert "Modules trained alongside, included: `model.multi_modal_projector`" in card
    assert "MIR (Modality Integration Rate, lower is better): not measured" in card
    assert commit["message"] == "Upload hf-normalign adapter"


def test_push_directory_uploads_it_as_it_is_minus_pickles_and_hidden_files(model, api, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{}")
    (tmp_path / "README.md").write_text("old card")
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x").write_text("x")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "notes.txt").write_text("notes")

    normalign.push_to_hub(tmp_path, "me/aligned", revision="dev", create_pr=True, api=api)
    (commit,) = api.commits
    assert set(commit["files"]) == FULL_FILES | {"preprocessor_config.json", "extra/notes.txt"}
    assert commit["files"]["README.md"].startswith(b"---\n")  # the generated card replaces the old one
    assert (commit["revision"], commit["pr"], api.branches) == ("dev", True, ["dev"])


def test_push_rejects_bad_input_before_creating_anything(model, api, tmp_path):
    tiny_model("llava").save_pretrained(tmp_path / "plain")
    with pytest.raises(normalign.NormAlignCheckpointError, match="holds no normalign_config.json"):
        normalign.push_to_hub(tmp_path / "plain", "me/x", api=api)
    model.save_pretrained(tmp_path / "aligned")
    with pytest.raises(ValueError, match="holds a full checkpoint, but adapter_only=True"):
        normalign.push_to_hub(tmp_path / "aligned", "me/x", adapter_only=True, api=api)
    with pytest.raises(ValueError, match="not patched"):
        normalign.push_to_hub(tiny_model("llava"), "me/x", api=api)
    assert api.repos == [] and api.commits == []


@pytest.fixture
def recorded(monkeypatch):
    """HfApi's network calls, recorded for every instance (also the ones transformers creates)."""
    recorder = RecordingApi()
    for name in ("create_repo", "create_commit", "create_branch"):
        monkeypatch.setattr(HfApi, name, lambda self, *a, _name=name, **k: getattr(recorder, _name)(*a, **k))
    return recorder


def test_transformers_push_paths_send_the_aligned_files(model, recorded, tmp_path):
    model.push_to_hub("me/a")
    model.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/b", private=True)
    assert [r["repo_id"] for r in recorded.repos] == ["me/a", "me/b"] and recorded.repos[1]["private"]
    assert [set(c["files"]) for c in recorded.commits] == [FULL_FILES, FULL_FILES]
    assert all(b"without the intervention" in c["files"]["README.md"] for c in recorded.commits)
    assert set(os.listdir(tmp_path / "saved")) == FULL_FILES - {"README.md"}


def test_cli_push(model, recorded, tmp_path, capsys):
    model.save_pretrained(tmp_path)
    capsys.readouterr()  # the save's own output (DeepSpeed's logger prints on stdout when first imported)
    assert cli.main(["push", str(tmp_path), "me/aligned", "--private", "--mir", "2.5"]) == 0
    assert capsys.readouterr().out == "https://huggingface.co/me/aligned/commit/" + "0" * 40 + "\n"
    (commit,) = recorded.commits
    assert set(commit["files"]) == FULL_FILES and recorded.repos[0]["private"] is True
    assert b"lower is better): 2.5000" in commit["files"]["README.md"]

    assert cli.main(["push", str(tmp_path), "me/aligned", "--adapter-only"]) == 1
    assert "holds a full checkpoint" in capsys.readouterr().err
    assert len(recorded.commits) == 1


# --- issue 25: the card shows a checkpoint's strings as text; symbolic links never reach outside the folder -----

HOSTILE = "evil`</code><script>alert(1)</script>\n# Injected [click](javascript:alert(1)) | cell | *em* &amp;"


def _rendered(card: str) -> tuple[list[str], str]:
    """The card's body (after the YAML front matter, as the Hub shows it) rendered by a CommonMark renderer that
    passes raw HTML through, with GFM tables: (the tags of the HTML, its text)."""
    from html.parser import HTMLParser

    from markdown_it import MarkdownIt  # installed with transformers (typer -> rich -> markdown-it-py)

    class Collect(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.tags: list[str] = []
            self.text: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

        def handle_data(self, data):
            self.text.append(data)

    parser = Collect()
    parser.feed(MarkdownIt("commonmark").enable("table").render(card.split("---\n", 2)[2]))
    return parser.tags, "".join(parser.text)


def test_model_card_shows_checkpoint_strings_as_text(model, tmp_path):
    import dataclasses

    from hf_normalign.hub import model_card

    model.save_pretrained(tmp_path)
    info = normalign.read_checkpoint_info(tmp_path)
    hostile = dataclasses.replace(
        info,
        base_model_name_or_path=HOSTILE,
        base_model_class=HOSTILE,
        base_model_revision=HOSTILE,
        library_version=HOSTILE,
        modules_to_save=(HOSTILE,),
    )
    card = model_card(hostile, "me/aligned", tags=[HOSTILE, "x\nbase_model: evil/model"])
    tags, text = _rendered(card)
    assert "script" not in tags and "a" not in tags and "em" not in tags, tags  # no markup from the values
    assert tags.count("h1") == 1 and tags.count("h2") == 3  # the card's own headings only
    shown = HOSTILE.replace("\n", "\\n")  # a newline is shown as an escape: it cannot start a heading
    assert text.count(shown) == 6, text  # base model twice, class, revision, library version, module
    settings_rows = [line for line in card.splitlines() if line.startswith("| ") and "`" in line]
    assert settings_rows and all(line.replace("\\|", "").count("|") == 4 for line in settings_rows)
    meta = front_matter(card)
    assert "base_model" not in meta and meta["tags"][-2:] == [HOSTILE, "x\nbase_model: evil/model"]
    with pytest.raises(ValueError, match="not a Hub repo id"):
        model_card(info, 'me/x")\nimport os  #')


def test_model_card_values_keep_their_look(model, api):
    normalign.push_to_hub(model, "me/aligned", api=api)
    card = api.commits[0]["files"]["README.md"].decode()
    assert f"on top of `{BASE_ID}`" in card and "model_type `llava`" in card  # code spans, unchanged by escaping


def _linked_folder(model, tmp_path, target: Path) -> Path:
    """An aligned save with ``notes.txt``, a symbolic link to ``target``."""
    folder = tmp_path / "aligned"
    model.save_pretrained(folder)
    (folder / "notes.txt").symlink_to(target)
    return folder


def test_push_refuses_a_symbolic_link_that_leads_outside_the_folder(model, api, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for upload")
    (tmp_path / "outside").mkdir()
    folder = _linked_folder(model, tmp_path, secret)
    with pytest.raises(ValueError, match=rf"{folder / 'notes.txt'} is a symbolic link to {secret}, outside"):
        normalign.push_to_hub(folder, "me/aligned", api=api)
    (folder / "notes.txt").unlink()
    (folder / "inner.txt").symlink_to(secret)  # a link inside, to a link that leads out: resolved whole
    (folder / "notes.txt").symlink_to(folder / "inner.txt")
    with pytest.raises(ValueError, match="outside"):
        normalign.push_to_hub(folder, "me/aligned", api=api)
    (folder / "notes.txt").unlink(), (folder / "inner.txt").unlink()
    (folder / "extra").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(ValueError, match=rf"{folder / 'extra'} is a symbolic link to"):
        normalign.push_to_hub(folder, "me/aligned", api=api)
    assert api.repos == [] and api.commits == []  # refused before the repo is created


def test_push_uploads_a_symbolic_link_to_a_file_inside_the_folder(model, api, tmp_path):
    folder = _linked_folder(model, tmp_path, tmp_path / "aligned" / "real.txt")
    (folder / "real.txt").write_text("kept")
    normalign.push_to_hub(folder, "me/aligned", api=api)
    assert api.commits[0]["files"]["notes.txt"] == b"kept"
