"""MIRCallback inside a real HF Trainer run on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import ReporterSpy
from transformers import Trainer, TrainingArguments

from hf_normalign.callbacks import MIRCallback
from hf_normalign.diagnostics.metrics.mir import mir
from hf_normalign.testing import tiny_batch, tiny_model, tiny_processor


class Rows(torch.utils.data.Dataset):
    def __init__(self, model, n: int = 32) -> None:
        self.rows = [tiny_batch(model, batch_size=1, seed=i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([it[k] for it in items]) for k in items[0]}


def run(tmp_path, callback: MIRCallback | None, *, lr: float, max_steps: int, processor=None, logging_steps: int = 1):
    model = tiny_model("llava")
    spy = ReporterSpy()
    args = TrainingArguments(
        str(tmp_path / "out"),
        max_steps=max_steps,
        learning_rate=lr,
        per_device_train_batch_size=2,
        logging_steps=logging_steps,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model, args, train_dataset=Rows(model), data_collator=collate, processing_class=processor,
        callbacks=[spy, callback] if callback else [spy],
    )  # fmt: skip
    trainer.train()
    return trainer, spy


def test_logs_mir_through_the_trainer(tmp_path):
    proc = tiny_processor("llava")
    callback = MIRCallback(every_n_steps=2, num_samples=6, batch_size=4, log_per_layer=True)
    trainer, spy = run(tmp_path, callback, lr=1e-2, max_steps=4, processor=proc)  # processor from the Trainer
    logged = [h for h in trainer.state.log_history if "mir" in h]
    assert [h["step"] for h in logged] == [2, 4] and trainer.state.global_step == 4
    assert [s["mir"] for s in spy.logged if "mir" in s] == [h["mir"] for h in logged]  # reporters see it
    assert {"mir_fid/layer_1", "mir_fid/layer_2"} <= set(logged[0])
    assert [step for step, _ in callback.results] == [2, 4]
    assert logged[0]["mir"] != logged[1]["mir"]  # the model trained in between
    assert trainer.model.training  # train mode restored after each measurement
    # The logged value is MIR of the trained model on the same fixed subset.
    final = mir(trainer.model, proc, num_samples=6, batch_size=4, progress=False)
    assert logged[-1]["mir"] == pytest.approx(final.mir, rel=1e-6)


def test_mir_is_logged_with_its_steps_loss(tmp_path):
    """Every `every_n_steps` the Trainer logs the loss too, even between `logging_steps`, and `mir` is in that
    entry; the losses are those of a run without the callback (logged every step) averaged the same way."""
    callback = MIRCallback(tiny_processor("llava"), every_n_steps=2, num_samples=4)
    trainer, spy = run(tmp_path / "mir", callback, lr=1e-2, max_steps=4, logging_steps=3)
    plain, _ = run(tmp_path / "plain", None, lr=1e-2, max_steps=4)
    step_loss = {h["step"]: h["loss"] for h in plain.state.log_history if "loss" in h}
    entries = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert sorted(entries) == [2, 3, 4] and all("mir" in entries[step] for step in (2, 4))
    expected = {2: (step_loss[1] + step_loss[2]) / 2, 3: step_loss[3], 4: step_loss[4]}
    assert {step: entry["loss"] for step, entry in entries.items()} == pytest.approx(expected, rel=1e-5)
    assert [s for s in spy.logged if "mir" in s] == [
        {k: v for k, v in entries[step].items() if k != "step"} for step in (2, 4)
    ]


def test_early_stopping_when_mir_stops_improving(tmp_path):
    # lr = 0: MIR is constant, so with min_delta > 0 every evaluation after the first is "no improvement".
    callback = MIRCallback(
        tiny_processor("llava"), every_n_steps=1, num_samples=4, early_stopping_patience=2, min_delta=1e-3
    )
    trainer, _ = run(tmp_path, callback, lr=0.0, max_steps=10)
    assert trainer.state.global_step == 3
    assert [h["step"] for h in trainer.state.log_history if "mir" in h] == [1, 2, 3]
    assert callback.evaluations_without_improvement == 2


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_steps"):
        MIRCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="patience"):
        MIRCallback(early_stopping_patience=0)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"every_n_steps": 2.5}, "every_n_steps must be an integer >= 1, got 2.5"),
        ({"every_n_steps": True}, "every_n_steps must be an integer >= 1, got True"),
        ({"num_samples": 0}, r"num_samples must be an integer >= 2 \(MIR needs at least 2 image-text pairs\), got 0"),
        ({"num_samples": 1}, "num_samples must be an integer >= 2"),
        ({"num_samples": 4.0}, "num_samples must be an integer >= 2"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"seed": "0"}, "seed must be an integer >= 0"),
        ({"early_stopping_patience": 1.5}, "early_stopping_patience must be an integer >= 1"),
        ({"min_delta": float("nan")}, "min_delta must be a finite number >= 0, got nan"),
        ({"min_delta": float("inf")}, "min_delta must be a finite number >= 0, got inf"),
        ({"min_delta": "0.01"}, "min_delta must be a finite number"),
        ({"min_delta": -0.1}, "min_delta must be >= 0, got -0.1"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, phrase):
    with pytest.raises(ValueError, match=f"MIRCallback: {phrase}"):
        MIRCallback(**kwargs)


def test_the_accepted_edge_values():
    callback = MIRCallback(every_n_steps=1, num_samples=None, early_stopping_patience=None, min_delta=0)
    assert (callback.every_n_steps, callback.num_samples, callback.min_delta) == (1, None, 0)
