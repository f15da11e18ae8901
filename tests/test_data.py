"""hf_normalign.data: LLaVA JSON / HF datasets rows, validation of bad rows, and the labelling collator."""

import json
import logging
import os

import pytest
import torch
from conftest import REQUIRED_FAMILIES, processor_or_skip
from transformers import AutoProcessor

import hf_normalign as normalign
from hf_normalign.data import BadRowError, LlavaJsonDataset, VLMDataCollator, from_hf_dataset
from hf_normalign.recipes.make_tiny_data import make_tiny_data
from hf_normalign.testing import tiny_model, tiny_processor


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    make_tiny_data(directory, num_samples=8)  # rows 3 and 7 are two-question conversations
    return directory


def rows(tiny_dir):
    with open(tiny_dir / "data.json") as f:
        return json.load(f)


def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def answers(item):
    return [m["content"] for m in item["messages"] if m["role"] == "assistant"]


def labelled_text(processor, batch, row):
    labels = batch["labels"][row]
    return processor.tokenizer.decode(labels[labels != -100])


# --- rows ------------------------------------------------------------------------------------------------------


def test_llava_json_rows(tiny_dir):
    ds = LlavaJsonDataset(tiny_dir / "data.json", tiny_dir)
    assert len(ds) == 8 and not ds.skipped
    item = ds[3]
    assert item["id"] == "00003" and item["index"] == 3
    assert [m["role"] for m in item["messages"]] == ["user", "assistant", "user", "assistant"]
    assert item["messages"][0]["content"].startswith("<image>")
    assert len(item["images"]) == 1 and item["images"][0].mode == "RGB"


def test_image_folder_defaults_to_the_json_directory_and_jsonl_reads(tiny_dir, tmp_path):
    assert len(LlavaJsonDataset(tiny_dir / "data.json")) == 8
    records = rows(tiny_dir)
    for r in records:
        r["image"] = str(tiny_dir / r["image"])  # absolute paths need no image folder
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    ds = LlavaJsonDataset(path)
    assert len(ds) == 8 and ds[0]["images"][0].size[0] > 0


def test_role_content_turns_and_text_only_rows(tiny_dir, tmp_path):
    records = [
        {"id": "t", "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}]},
        {
            "id": "i",
            "image": ["images/00000.png", "images/00001.png"],
            "conversations": [
                {"from": "system", "value": "be brief."},
                {"from": "human", "value": "<image> and <image>: same colour?"},
                {"from": "gpt", "value": "no."},
            ],
        },
    ]
    ds = LlavaJsonDataset(write(tmp_path, records), tiny_dir)
    assert ds[0]["images"] == [] and len(ds[1]["images"]) == 2
    assert [m["role"] for m in ds[1]["messages"]] == ["system", "user", "assistant"]


# --- bad rows ----------------------------------------------------------------------------------------------------


# (test id, kind of bad row) of the records `bad_records` builds, in the same order.
BAD_KINDS = [
    ("missing-file", "missing image file"),
    ("no-placeholder", "image/placeholder count mismatch"),
    ("no-image", "image/placeholder count mismatch"),
    ("garbage-bytes", "undecodable image"),
    ("truncated-png", "undecodable image"),
    ("no-turns", "empty conversation"),
    ("blank-answer", "empty conversation"),
]


def bad_records(tiny_dir, tmp_path) -> list[dict]:
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    good = (tiny_dir / "images/00000.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    conv = [{"from": "human", "value": "<image>\ndescribe."}, {"from": "gpt", "value": "a shape."}]
    text = [{"from": "human", "value": "describe."}, {"from": "gpt", "value": "a shape."}]
    return [
        {"image": "images/nope.png", "conversations": conv},
        {"image": "images/00000.png", "conversations": text},
        {"conversations": conv},
        {"image": str(tmp_path / "garbage.png"), "conversations": conv},
        {"image": str(tmp_path / "truncated.png"), "conversations": conv},
        {"image": "images/00000.png", "conversations": []},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]},
    ]


@pytest.mark.parametrize("case", range(len(BAD_KINDS)), ids=[name for name, _ in BAD_KINDS])
def test_bad_row_is_named(tiny_dir, tmp_path, case):
    kind = BAD_KINDS[case][1]
    records = rows(tiny_dir)[:3]
    records.insert(2, {"id": "bad-one", **bad_records(tiny_dir, tmp_path)[case]})
    path = write(tmp_path, records)
    with pytest.raises(BadRowError) as info:
        LlavaJsonDataset(path, tiny_dir)
    err = info.value
    assert (err.index, err.row_id, err.kind) == (2, "bad-one", kind)
    assert str(err).startswith(f"{path}: row 2 (id 'bad-one'): {kind}:")


def test_skip_bad_rows_counts_each_kind(tiny_dir, tmp_path, caplog):
    bad = bad_records(tiny_dir, tmp_path)
    records = rows(tiny_dir) + [{"id": f"bad{i}", **row} for i, row in enumerate(bad)]
    with caplog.at_level(logging.WARNING, logger="hf_normalign.data"):
        ds = LlavaJsonDataset(write(tmp_path, records), tiny_dir, skip_bad_rows=True)
    assert len(ds) == 8
    assert dict(ds.skipped) == {
        "missing image file": 1,
        "image/placeholder count mismatch": 2,
        "undecodable image": 2,
        "empty conversation": 2,
    }
    assert "skipped 7 of 15 rows" in caplog.text and "2 undecodable image" in caplog.text
    assert "row 8 (id 'bad0')" in caplog.text  # the first one, in full


def test_lazy_decoding_names_the_row_on_access(tiny_dir, tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"nope")
    records = rows(tiny_dir)[:2]
    records[1]["image"] = str(tmp_path / "garbage.png")
    ds = LlavaJsonDataset(write(tmp_path, records), tiny_dir, verify_images=False)
    assert len(ds) == 2  # the file exists: only decoding finds the problem
    with pytest.raises(BadRowError, match=r"row 1 \(id '00001'\): undecodable image"):
        ds[1]


def test_malformed_records(tiny_dir, tmp_path):
    for record, match in [
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown speaker 'robot'"),
        ({"conversations": "hello"}, "must be a list of turns"),
        (
            {
                "image": "images/00000.png",
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}],
            },
            "assistant turn",
        ),
    ]:
        with pytest.raises(BadRowError, match=match):
            LlavaJsonDataset(write(tmp_path, [record]), tiny_dir)
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("[{")
        LlavaJsonDataset(tmp_path / "broken.json")


# --- HF datasets -------------------------------------------------------------------------------------------------


def test_hf_dataset_with_paths_and_image_features(tiny_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    records = rows(tiny_dir)
    ds = datasets.Dataset.from_list(records)
    wrapped = from_hf_dataset(ds, image_folder=tiny_dir)
    assert len(wrapped) == 8 and answers(wrapped[3]) == answers(LlavaJsonDataset(tiny_dir / "data.json")[3])

    (tmp_path / "garbage.png").write_bytes(b"nope")
    for r in records:
        r["image"] = str(tiny_dir / r["image"])
    records[5]["image"] = str(tmp_path / "garbage.png")
    features = datasets.Dataset.from_list(records).cast_column("image", datasets.Image())
    with pytest.raises(BadRowError, match=r"dataset: row 5 \(id '00005'\): undecodable image"):
        from_hf_dataset(features)
    skipped = from_hf_dataset(features, skip_bad_rows=True)
    assert len(skipped) == 7 and skipped.skipped == {"undecodable image": 1}
    assert skipped[0]["images"][0].mode == "RGB"

    # a list of datasets.Image() per row, stored and reloaded the way `load_from_disk` gives it back
    listed = datasets.Dataset.from_dict(
        {"image": [[r["image"]] for r in records[:4]], "conversations": [r["conversations"] for r in records[:4]]}
    ).cast_column("image", datasets.List(datasets.Image()))
    listed.save_to_disk(tmp_path / "saved")
    reloaded = from_hf_dataset(datasets.load_from_disk(tmp_path / "saved"))
    assert len(reloaded) == 4 and len(reloaded[2]["images"]) == 1


def test_hf_dataset_needs_the_conversations_column(tiny_dir):
    datasets = pytest.importorskip("datasets")
    with pytest.raises(ValueError, match="no column 'messages'"):
        from_hf_dataset(datasets.Dataset.from_list(rows(tiny_dir)), conversations_column="messages")


# --- collator ----------------------------------------------------------------------------------------------------

COLLATED_FAMILIES = (*REQUIRED_FAMILIES, "gemma3", "idefics3")


@pytest.mark.parametrize("family", COLLATED_FAMILIES)
def test_collator_labels_only_assistant_text(tiny_dir, family):
    ds = LlavaJsonDataset(tiny_dir / "data.json")
    items = [ds[0], ds[3], ds[1]]
    processor = processor_or_skip(family)
    batch = VLMDataCollator(processor)(items)
    for row, item in enumerate(items):
        assert labelled_text(processor, batch, row).split() == " ".join(answers(item)).split()
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert (labels[mask == 0] == -100).all()  # padding
    model = normalign.patch(tiny_model(family), methods=["projector_norm", "moca", "pre"])
    assert (labels[torch.isin(ids, torch.tensor(model.normalign.vision_token_ids))] == -100).all()
    assert not (mask[:, :-1] < mask[:, 1:]).any()  # right padding
    model.train()
    out = model(**batch)
    assert out.loss.isfinite() and out["pre_loss"] > 0


def test_processor_chat_template_from_a_saved_processor(tiny_dir, tmp_path):
    tiny_processor("llava").save_pretrained(tmp_path)  # the tokenizer's template becomes the processor's
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert processor.chat_template
    item = LlavaJsonDataset(tiny_dir / "data.json")[3]
    batch = VLMDataCollator(processor)([item])
    assert labelled_text(processor, batch, 0).split() == ["red.", "a", "square."]


def test_paligemma_is_refused():
    with pytest.raises(ValueError, match="PaliGemma"):
        VLMDataCollator(tiny_processor("paligemma"))


def test_collator_mixes_text_only_rows(tiny_dir, tmp_path):
    records = [{"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello."}]}]
    text_only = LlavaJsonDataset(write(tmp_path, records))[0]
    with_image = LlavaJsonDataset(tiny_dir / "data.json")[0]
    processor = tiny_processor("llava")
    collate = VLMDataCollator(processor)
    model = tiny_model("llava")
    for items in ([text_only, with_image], [text_only, text_only]):
        batch = collate(items)
        assert labelled_text(processor, batch, 0) == "hello."
        assert model(**batch).loss.isfinite()


def test_plain_template_labels_the_answer_and_eos(tiny_dir):
    processor = tiny_processor("llava")
    item = LlavaJsonDataset(tiny_dir / "data.json")[3]
    batch = VLMDataCollator(processor, template="plain")([item])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert "USER: <image>" in text and "ASSISTANT: red.</s>" in text.replace(" </s>", "</s>")
    assert labelled_text(processor, batch, 0).split() == ["red.</s>", "a", "square.</s>"]


def test_answer_repeating_the_question_is_labelled_in_its_own_turn(tmp_path):
    records = [{"conversations": [{"from": "human", "value": "say red."}, {"from": "gpt", "value": "red."}]}]
    processor = tiny_processor("llava")
    batch = VLMDataCollator(processor)([LlavaJsonDataset(write(tmp_path, records))[0]])
    labels = batch["labels"][0]
    positions = (labels != -100).nonzero().flatten()
    assert processor.tokenizer.decode(labels[positions]) == "red."
    assert positions.min() > len(processor.tokenizer("say red.").input_ids)  # not the question's "red."


def test_max_length_cuts_text_but_never_image_tokens(tiny_dir):
    ds = LlavaJsonDataset(tiny_dir / "data.json")
    processor = tiny_processor("llava")
    full = VLMDataCollator(processor)([ds[3]])
    n = full["input_ids"].shape[1]
    cut = VLMDataCollator(processor, max_length=n - 3)([ds[3]])
    assert all(v.shape[1] == n - 3 for k, v in cut.items() if k in ("input_ids", "attention_mask", "labels"))
    assert torch.equal(cut["labels"], full["labels"][:, : n - 3])
    with pytest.raises(BadRowError, match=r"row 3 \(id '00003'\): too long for max_length"):
        VLMDataCollator(processor, max_length=5)([ds[3]])


def test_collator_refuses_unknown_template():
    with pytest.raises(ValueError, match="template"):
        VLMDataCollator(tiny_processor("llava"), template="chatml")


def test_make_tiny_data_is_deterministic(tmp_path):
    a = make_tiny_data(tmp_path / "a", num_samples=4, seed=3)
    b = make_tiny_data(tmp_path / "b", num_samples=4, seed=3)
    with open(a) as fa, open(b) as fb:
        assert fa.read() == fb.read()
    assert (tmp_path / "a/images/00003.png").read_bytes() == (tmp_path / "b/images/00003.png").read_bytes()
    assert sorted(os.listdir(tmp_path / "a/images")) == [f"{i:05d}.png" for i in range(4)]
