"""Conversation data for VLM training: LLaVA-style JSON or a HF ``datasets`` dataset, and a collator.

Two row formats are read, both holding LLaVA-style conversations with ``<image>`` placeholders::

    # LLaVA JSON (a list of records; .jsonl with one record a line also works), images under image_folder
    {"id": "000001", "image": "coco/000001.png",            # a path, a list of paths, or absent (text only)
     "conversations": [{"from": "human", "value": "<image>\\nDescribe the picture."},
                       {"from": "gpt", "value": "A red square on a blue background."}]}

    # HF datasets: the same columns; "image" may also be a datasets.Image() (or a list of them)
    ds = datasets.load_dataset("json", data_files="data.json", split="train")   # or load_from_disk(...)

``from``/``value`` may also be ``role``/``content`` (roles ``human``/``user``, ``gpt``/``assistant``, ``system``).

Usage::

    from hf_normalign.data import LlavaJsonDataset, VLMDataCollator, from_hf_dataset

    train = LlavaJsonDataset("data/llava.json", "data/images", skip_bad_rows=True)
    collate = VLMDataCollator(processor, max_length=2048)
    batch = collate([train[0], train[1]])          # processor outputs + labels (-100 outside assistant text)

Validation happens when the dataset is built, so a bad row fails before any training step: every row is
parsed, its ``<image>`` placeholders counted against its images, and every image file opened and fully
decoded with PIL (``verify_images=False`` skips the decoding, for very large sets: an undecodable image then
raises when its row is first read). A bad row (missing image file, placeholder/image count mismatch,
undecodable image, empty conversation, malformed record) raises :class:`BadRowError` naming the row index,
its id and the problem; with ``skip_bad_rows=True`` such rows are left out and counted per kind in
``dataset.skipped``, and one warning summarises them.
"""

from __future__ import annotations

import difflib
import io
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers.utils import logging

from .text_files import read_json, read_jsonl

logger = logging.get_logger(__name__)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "BadRowError",
    "ConversationDataset",
    "LlavaJsonDataset",
    "VLMDataCollator",
    "from_hf_dataset",
]

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Kinds of bad rows (the keys of `ConversationDataset.skipped`).
MISSING_IMAGE = "missing image file"
COUNT_MISMATCH = "image/placeholder count mismatch"
UNDECODABLE_IMAGE = "undecodable image"
EMPTY_CONVERSATION = "empty conversation"
MALFORMED = "malformed row"
TOO_LONG = "too long for max_length"


class BadRowError(ValueError):
    """A data row that cannot be trained on; the message names the source, row index, id and problem."""

    def __init__(self, source: str, index: int, row_id: Any, kind: str, detail: str) -> None:
        self.source, self.index, self.row_id, self.kind, self.detail = source, index, row_id, kind, detail
        name = f"row {index}" if row_id is None else f"row {index} (id {row_id!r})"
        super().__init__(f"{source}: {name}: {kind}: {detail}")


# --- rows ------------------------------------------------------------------------------------------------------


class ConversationDataset(torch.utils.data.Dataset):
    """Validated conversation rows; each item is ``{"index", "id", "images": [PIL RGB], "messages"}``.

    ``messages`` are ``{"role": "user" | "assistant" | "system", "content": str}`` with ``<image>``
    placeholders left in the text; :class:`VLMDataCollator` renders and tokenizes them.

    Args:
        rows: a sequence of mappings (a list of dicts, or a ``datasets.Dataset``).
        image_folder: base directory of relative image paths.
        image_column, conversations_column, id_column: the keys of a row.
        skip_bad_rows: leave bad rows out (counted in ``skipped``) instead of raising :class:`BadRowError`.
        verify_images: decode every image while validating (see the module docstring).
        source: the name of the data in messages (a file name).
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        *,
        image_folder: str | os.PathLike | None = None,
        image_column: str = "image",
        conversations_column: str = "conversations",
        id_column: str = "id",
        skip_bad_rows: bool = False,
        verify_images: bool = True,
        source: str = "data",
    ) -> None:
        self.rows = rows
        self.image_folder = None if image_folder is None else os.fspath(image_folder)
        self.image_column, self.conversations_column, self.id_column = image_column, conversations_column, id_column
        self.source = source
        self.skipped: Counter[str] = Counter()
        self.kept: list[int] = []
        first_skip: BadRowError | None = None
        for index in range(len(rows)):
            try:
                self._parse(index, decode=verify_images)
            except BadRowError as err:
                if not skip_bad_rows:
                    raise
                self.skipped[err.kind] += 1
                first_skip = first_skip or err
                continue
            self.kept.append(index)
        if first_skip is not None:
            kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.skipped.items()))
            logger.warning(
                f"{source}: skipped {sum(self.skipped.values())} of {len(rows)} rows ({kinds}); first: {first_skip}"
            )
        if not self.kept:
            raise ValueError(f"{source}: no usable rows (of {len(rows)}).")

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.kept[i]
        row_id, messages, images = self._parse(index, decode=True)
        return {"index": index, "id": row_id, "images": images, "messages": messages}

    def _parse(self, index: int, *, decode: bool) -> tuple[Any, list[dict[str, str]], list[Any]]:
        """(id, messages, images) of one row; images are PIL images when ``decode`` else their references."""
        row = self.rows[index]
        if not isinstance(row, Mapping):
            raise BadRowError(self.source, index, None, MALFORMED, f"expected an object, got {type(row).__name__}")
        row_id = row.get(self.id_column)

        def bad(kind: str, detail: str) -> BadRowError:
            return BadRowError(self.source, index, row_id, kind, detail)

        messages = _messages(row.get(self.conversations_column), self.conversations_column, bad)
        refs = row.get(self.image_column)
        refs = [] if refs is None else list(refs) if isinstance(refs, (list, tuple)) else [refs]
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if placeholders != len(refs):
            raise bad(COUNT_MISMATCH, f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(refs)} image(s)")
        if any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] == "assistant"):
            raise bad(MALFORMED, f"an assistant turn holds an {IMAGE_PLACEHOLDER} placeholder")
        images = [self._image(ref, bad, decode) for ref in refs]
        return row_id, messages, images

    def _image(self, ref: Any, bad: Callable[[str, str], BadRowError], decode: bool) -> Any:
        from PIL import Image, UnidentifiedImageError

        if isinstance(ref, Image.Image):
            return ref.convert("RGB")
        path, data = ref, None
        if isinstance(ref, Mapping):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            path, data = ref.get("path"), ref.get("bytes")
        if data is None:
            if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
                raise bad(MALFORMED, f"image reference {ref!r} is neither a path, image bytes nor a PIL image")
            path = os.fspath(path)
            if self.image_folder is not None and not os.path.isabs(path):
                path = os.path.join(self.image_folder, path)
            if not os.path.isfile(path):
                raise bad(MISSING_IMAGE, f"{path} does not exist")
            if not decode:
                return ref
        elif not decode:
            return ref
        try:
            with Image.open(io.BytesIO(data) if data is not None else path) as image:
                return image.convert("RGB")  # convert() decodes the whole image: truncated files fail here
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise bad(UNDECODABLE_IMAGE, f"{path or 'image bytes'}: {err}") from err


def _messages(conversation: Any, column: str, bad: Callable[[str, str], BadRowError]) -> list[dict[str, str]]:
    if conversation is None or (isinstance(conversation, (list, tuple)) and not conversation):
        raise bad(EMPTY_CONVERSATION, f"{column!r} is missing or empty")
    if not isinstance(conversation, (list, tuple)):
        raise bad(MALFORMED, f"{column!r} must be a list of turns, got {type(conversation).__name__}")
    messages = []
    for turn in conversation:
        if not isinstance(turn, Mapping):
            raise bad(MALFORMED, f"a turn must be an object, got {turn!r}")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if speaker not in _ROLES:
            raise bad(MALFORMED, f"unknown speaker {speaker!r} (expected one of {sorted(_ROLES)})")
        if not isinstance(text, str):
            raise bad(MALFORMED, f"the text of a {speaker!r} turn must be a string, got {type(text).__name__}")
        messages.append({"role": _ROLES[speaker], "content": text})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise bad(EMPTY_CONVERSATION, "no assistant turn with text: nothing to train on")
    return messages


class LlavaJsonDataset(ConversationDataset):
    """LLaVA-style records from a ``.json`` (a list) or ``.jsonl`` file; images relative to ``image_folder``.

    Example:
        >>> train = LlavaJsonDataset("data/llava.json", "data/images")           # doctest: +SKIP
        >>> train[0]["messages"][0]                                              # doctest: +SKIP
        {'role': 'user', 'content': '<image>\\nDescribe the picture.'}

    ``image_folder`` defaults to the JSON file's directory. Other keyword arguments: see
    :class:`ConversationDataset`.
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        image_folder: str | os.PathLike | None = None,
        *,
        skip_bad_rows: bool = False,
        verify_images: bool = True,
        **columns: str,
    ) -> None:
        json_path = os.fspath(json_path)
        rows = [row for _, row in read_jsonl(json_path)] if json_path.endswith(".jsonl") else read_json(json_path)
        if not isinstance(rows, list):
            raise ValueError(f"{json_path} must hold a JSON list of records, got {type(rows).__name__}")
        super().__init__(
            rows,
            image_folder=os.path.dirname(os.path.abspath(json_path)) if image_folder is None else image_folder,
            skip_bad_rows=skip_bad_rows,
            verify_images=verify_images,
            source=json_path,
            **columns,
        )


def from_hf_dataset(
    ds: Any,
    *,
    image_folder: str | os.PathLike | None = None,
    image_column: str = "image",
    conversations_column: str = "conversations",
    id_column: str = "id",
    skip_bad_rows: bool = False,
    verify_images: bool = True,
    source: str = "dataset",
) -> ConversationDataset:
    """Wrap a ``datasets.Dataset`` of LLaVA-style rows (see the module docstring) as a validated dataset.

    The image column may hold paths (relative to ``image_folder``), ``datasets.Image()`` values (or lists of
    them) or be absent. Image features are read undecoded and decoded here, so a broken image is reported
    with its row instead of failing inside ``datasets``.

    Example:
        >>> ds = datasets.load_dataset("json", data_files="llava.json", split="train")   # doctest: +SKIP
        >>> train = from_hf_dataset(ds, image_folder="images")                             # doctest: +SKIP
    """
    import datasets

    if conversations_column not in ds.column_names:
        raise ValueError(f"the dataset has no column {conversations_column!r}; its columns: {ds.column_names}")
    feature = ds.features.get(image_column)
    inner = getattr(feature, "feature", None)  # List(Image()) / Sequence(Image())
    if isinstance(feature, datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    elif isinstance(inner, datasets.Image):
        ds = ds.cast_column(image_column, type(feature)(datasets.Image(decode=False)))
    return ConversationDataset(
        ds,
        image_folder=image_folder,
        image_column=image_column,
        conversations_column=conversations_column,
        id_column=id_column,
        skip_bad_rows=skip_bad_rows,
        verify_images=verify_images,
        source=source,
    )


# --- collator ----------------------------------------------------------------------------------------------------

# Per-token tensors of a processor output, cut together when truncating to max_length.
_TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids")


class VLMDataCollator:
    """Render, tokenize, pad and label a batch of :class:`ConversationDataset` items with a VLM processor.

    The conversation is rendered with the processor's chat template, else the tokenizer's, else a plain
    ``"USER: ... ASSISTANT: ...</s>"`` template (``template="plain"`` forces it); images go in where the
    ``<image>`` placeholders were. The processor expands the placeholders and pads on the right. ``labels``
    copy ``input_ids`` on the assistant text (and the end-of-turn token right after it) and are -100
    elsewhere: user and system turns, the template's role markers, image tokens and padding.

    ``max_length`` cuts longer rows; a row whose image tokens would be cut raises :class:`BadRowError`
    (drop or shorten it).

    Example:
        >>> collate = VLMDataCollator(processor)                                   # doctest: +SKIP
        >>> trainer = Trainer(model, args, train_dataset=train, data_collator=collate)   # doctest: +SKIP
    """

    def __init__(self, processor: Any, *, max_length: int | None = None, template: str = "auto") -> None:
        if template not in ("auto", "plain"):
            raise ValueError(f"template must be 'auto' or 'plain', got {template!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if type(processor).__name__ == "PaliGemmaProcessor":
            # Without `suffix=` it marks the whole sequence as the bidirectional prefix: answers would be visible.
            raise ValueError("PaliGemma trains prefix/suffix pairs (processor(suffix=...)); VLMDataCollator does not")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.template = template
        self.image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
        ids = [getattr(processor, name, None) for name in ("image_token_id", "video_token_id")]
        ids += [self.tokenizer.convert_tokens_to_ids(self.image_token)]
        self.vision_token_ids = sorted({int(i) for i in ids if isinstance(i, int) and i >= 0})
        specials = {t.content for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values() if t.special}
        specials |= {t for t in (self.tokenizer.eos_token,) if t}
        # Longest first, so a token that prefixes another never shadows it.
        self._end_tokens = sorted(specials - {self.image_token}, key=len, reverse=True)

    # Rendering ---------------------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]], bool]:
        """(text, character spans of assistant text, whether the tokenizer should add special tokens)."""
        if self.template == "auto" and getattr(self.processor, "chat_template", None):
            text = self.processor.apply_chat_template(_multimodal(messages), tokenize=False)
        elif self.template == "auto" and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(_multimodal(messages), tokenize=False)
        else:
            return self._render_plain(messages)
        spans, cursor = [], 0
        for message in messages:
            if message["role"] != "assistant":
                # Step over the turn's own text, so an answer that repeats the question is found in its turn.
                for piece in message["content"].split(IMAGE_PLACEHOLDER):
                    found = text.find(piece.strip(), cursor) if piece.strip() else -1
                    cursor = found + len(piece.strip()) if found >= 0 else cursor
                continue
            answer = message["content"].strip()
            start = text.find(answer, cursor)
            if start < 0:
                raise ValueError(
                    f"The chat template changes the assistant text {answer[:40]!r}, so its tokens cannot be located "
                    "for the labels; use the plain template (VLMDataCollator(template='plain'))."
                )
            end = start + len(answer)
            end += next((len(t) for t in self._end_tokens if text.startswith(t, end)), 0)
            spans.append((start, end))
            cursor = end
        bos = self.tokenizer.bos_token
        return text, spans, not (bos and text.startswith(bos))  # a template that writes bos gets no second one

    def _render_plain(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]], bool]:
        text, spans = "", []
        eos = self.tokenizer.eos_token or ""
        for message in messages:
            content = message["content"].strip().replace(IMAGE_PLACEHOLDER, self.image_token)
            if message["role"] == "assistant":
                text += "ASSISTANT: "
                spans.append((len(text), len(text) + len(content) + len(eos)))
                text += content + eos
            else:
                text += f"{'USER' if message['role'] == 'user' else 'SYSTEM'}: {content} "
        return text, spans, True

    # Collation ---------------------------------------------------------------------------------------------
    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rendered = [self.render(item["messages"]) for item in items]
        texts = [text for text, _, _ in rendered]
        add_special = all(add for _, _, add in rendered)
        images = [item["images"] for item in items]
        batch = self.processor(
            text=texts,
            images=images if any(images) else None,
            padding=True,
            padding_side="right",
            add_special_tokens=add_special,
            return_tensors="pt",
        )
        batch = dict(batch)
        labels = torch.full_like(batch["input_ids"], -100)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for row, ((text, spans, _), item) in enumerate(zip(rendered, items, strict=True)):
            expanded = batch["input_ids"][row, : lengths[row]]
            labels[row, : lengths[row]] = self._row_labels(text, spans, add_special, expanded, item)
        if self.vision_token_ids:
            labels[torch.isin(batch["input_ids"], torch.tensor(self.vision_token_ids))] = -100
        batch["labels"] = labels
        return self._truncate(batch, items) if self.max_length is not None else batch

    def _row_labels(
        self, text: str, spans: list[tuple[int, int]], add_special: bool, expanded: torch.Tensor, item: dict
    ) -> torch.Tensor:
        # Tokenize the unexpanded text with offsets, mark assistant tokens, then carry the marks over to the
        # processor's ids (where each image placeholder became many tokens) by aligning the two id sequences.
        enc = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        plain = enc["input_ids"]
        marked = [any(s < end and e > start for start, end in spans) for s, e in enc["offset_mapping"]]
        ids = expanded.tolist()
        labels = torch.full_like(expanded, -100)
        matcher = difflib.SequenceMatcher(None, plain, ids, autojunk=False)
        for a, b, size in matcher.get_matching_blocks():
            for k in range(size):
                if marked[a + k]:
                    labels[b + k] = ids[b + k]
        if int((labels != -100).sum()) != sum(marked):
            raise BadRowError(
                "collator",
                item.get("index", -1),
                item.get("id"),
                MALFORMED,
                "the processor tokenized the assistant text differently from the tokenizer; cannot build labels",
            )
        return labels

    def _truncate(self, batch: dict[str, torch.Tensor], items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = batch["input_ids"].shape[1]
        if width <= self.max_length:
            return batch
        cut = batch["input_ids"][:, self.max_length :]
        if self.vision_token_ids:
            real = batch["attention_mask"][:, self.max_length :].bool()
            lost = torch.isin(cut, torch.tensor(self.vision_token_ids)) & real
            for row in lost.any(dim=1).nonzero().flatten().tolist():
                item = items[row]
                raise BadRowError(
                    "collator",
                    item.get("index", -1),
                    item.get("id"),
                    TOO_LONG,
                    f"{int(batch['attention_mask'][row].sum())} tokens, and cutting at max_length={self.max_length} "
                    "would cut image tokens",
                )
        for key in _TOKEN_KEYS:
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == width:
                batch[key] = value[:, : self.max_length]
        return batch


def _multimodal(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Messages in the content-parts form chat templates expect: ``<image>`` becomes an image part."""
    out = []
    for message in messages:
        parts: list[dict[str, str]] = []
        for i, piece in enumerate(message["content"].split(IMAGE_PLACEHOLDER)):
            if i:
                parts.append({"type": "image"})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        out.append({"role": message["role"], "content": parts})
    return out
