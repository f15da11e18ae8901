"""The recipe's training data: LLaVA JSON/JSONL, a ``save_to_disk`` directory, or a ``datasets`` name, read and
validated whole (every row, images decoded unless ``verify_images: false``) before the model is loaded.

Usage::

    from hf_normalign.recipes.dataset import load_dataset
    rows = load_dataset(config.data)  # raises ConfigError (unreadable) or BadRowError (a bad row)
"""

from __future__ import annotations

import os
from typing import Any

from hf_normalign.data import BadRowError, ConversationDataset, LlavaJsonDataset, from_hf_dataset
from hf_normalign.recipes.arguments import DataArguments
from hf_normalign.recipes.config import ConfigError

__all__ = ["load_dataset"]


def load_dataset(data_args: DataArguments) -> ConversationDataset:
    """LLaVA JSON/JSONL, a ``save_to_disk`` directory, or anything ``datasets.load_dataset`` reads."""
    columns = {
        "image_column": data_args.image_column,
        "conversations_column": data_args.conversations_column,
        "id_column": data_args.id_column,
    }
    options = {"skip_bad_rows": data_args.skip_bad_rows, "verify_images": data_args.verify_images}
    try:
        return _read_dataset(data_args, options, columns)
    except BadRowError:
        raise
    except (OSError, ValueError) as err:  # invalid JSON, not UTF-8, a dict instead of a list, a missing column
        raise ConfigError(f"data_path {data_args.data_path}: {err}") from err


def _read_dataset(data_args: DataArguments, options: dict[str, Any], columns: dict[str, str]) -> ConversationDataset:
    path = data_args.data_path
    if path.endswith((".json", ".jsonl")):
        return LlavaJsonDataset(path, data_args.image_folder, **options, **columns)
    import datasets

    if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "state.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[data_args.dataset_split]
    else:
        ds = datasets.load_dataset(path, split=data_args.dataset_split)
    return from_hf_dataset(ds, image_folder=data_args.image_folder, source=path, **options, **columns)
