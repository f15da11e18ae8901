import os

import pytest
import torch
from transformers import TrainerCallback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models: thread hand-off dominates, one intra-op thread is much faster on 2 cores.
torch.set_num_threads(1)

REQUIRED_FAMILIES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
)
EXTRA_FAMILIES = ("gemma3", "idefics3", "smolvlm", "mistral3", "paligemma")
ALL_FAMILIES = REQUIRED_FAMILIES + EXTRA_FAMILIES


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def processor_or_skip(family: str):
    """`tiny_processor(family)`, or a skip naming why this transformers release cannot build it."""
    from hf_normalign.testing import tiny_processor

    try:
        return tiny_processor(family)
    except NotImplementedError as err:
        pytest.skip(str(err))


class ReporterSpy(TrainerCallback):
    """Stands where reporting integrations (TensorBoard, W&B) and the console printer stand: before the user's
    callbacks. Records each step's ``logs`` as it saw them."""

    def __init__(self) -> None:
        self.logged: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs))
