"""LossScaleTelemetryCallback: stability metrics reach log_history and an offline W&B run, with both trainers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import wandb
from transformers import Trainer, TrainerCallback, default_data_collator

from hf_stability import LossScaleTelemetryCallback, SkipNonFiniteCallback, SpikeRollbackCallback, StabilityTrainer
from hf_stability.callbacks.order import find_callback
from hf_stability.step.telemetry import fp16_pressure
from tests.testing_utils import (
    NoLabelBatches,
    PoisonGradient,
    emulate_fp16_scaler,
    mlm_dataset,
    offline_wandb_history,
    tiny_bert,
    training_args,
)

STABILITY_KEYS = ("stability/skipped_steps", "stability/rollbacks", "stability/loss_scale")


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=64)


def wandb_history(wandb_dir: Path) -> list[dict]:
    """The history rows of the single offline run under ``wandb_dir``, read back with ``wandb leet inspect``."""
    wandb.finish()  # WandbCallback leaves the run open after train(); finishing flushes it to disk
    wandb.teardown()  # the next run in this process reads WANDB_DIR afresh
    runs = sorted(wandb_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1, runs
    return offline_wandb_history(runs[0])


def assert_wandb_matches_log_history(history: list[dict], log_history: list[dict]) -> None:
    entries = {entry["step"]: entry for entry in log_history if "loss" in entry}
    rows = {row["train/global_step"]: row for row in history if "train/loss" in row}
    assert rows.keys() == entries.keys()
    for step, entry in entries.items():
        for key in STABILITY_KEYS:
            assert rows[step][f"train/{key}"] == entry[key], (step, key)


def test_stability_trainer_logs_reach_log_history_and_wandb(tmp_path, monkeypatch, bert_tokenizer, dataset):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = training_args(tmp_path, max_steps=4, fp16=True, report_to=["wandb"], run_name="stability-trainer")
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset, callbacks=[PoisonGradient([1])])
    emulate_fp16_scaler(trainer, init_scale=2.0**10)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["stability/skipped_steps"] for entry in logged] == [0, 1, 1, 1]
    assert [entry["stability/loss_scale"] for entry in logged] == [2.0**10, 2.0**9, 2.0**9, 2.0**9]
    assert all(entry["stability/rollbacks"] == 0 for entry in logged)
    assert_wandb_matches_log_history(wandb_history(tmp_path), trainer.state.log_history)


def test_plain_trainer_with_attached_callback_reaches_wandb(tmp_path, monkeypatch, bert_tokenizer, dataset):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = training_args(tmp_path, max_steps=4, fp16=True, report_to=["wandb"], run_name="plain-trainer")
    trainer = Trainer(
        tiny_bert(bert_tokenizer), args, train_dataset=dataset, callbacks=[SkipNonFiniteCallback(), PoisonGradient([1])]
    )
    LossScaleTelemetryCallback.attach(trainer)
    names = [type(callback).__name__ for callback in trainer.callback_handler.callbacks]
    assert names.index("LossScaleTelemetryCallback") < names.index("WandbCallback")
    emulate_fp16_scaler(trainer, init_scale=2.0**10)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["stability/skipped_steps"] for entry in logged] == [0, 1, 1, 1]
    assert_wandb_matches_log_history(wandb_history(tmp_path), trainer.state.log_history)


def test_unattached_callback_fills_log_history_and_warns(tmp_path, bert_tokenizer, dataset, caplog):
    trainer = Trainer(
        tiny_bert(bert_tokenizer),
        training_args(tmp_path, max_steps=2, fp16=True),
        train_dataset=dataset,
        callbacks=[LossScaleTelemetryCallback()],
    )
    emulate_fp16_scaler(trainer, init_scale=2.0**8)
    with caplog.at_level("WARNING", logger="hf_stability.callbacks.telemetry"):
        trainer.train()
    assert "not attached" in caplog.text
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["stability/loss_scale"] for entry in logged] == [2.0**8, 2.0**8]
    assert all("stability/fp16_headroom_log2" in entry and "stability/rollbacks" not in entry for entry in logged)


class GradientCapture(TrainerCallback):
    """Keeps a copy of the gradients and the loss scale that telemetry sees on logging steps."""

    def __init__(self, scaler):
        self.scaler = scaler
        self.captured: dict[int, tuple[dict[str, torch.Tensor], float]] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        self.captured[state.global_step + 1] = (grads, self.scaler.get_scale())


def test_fp16_pressure_and_layer_norms_match_a_direct_computation(tmp_path, bert_tokenizer, dataset):
    args = training_args(tmp_path, max_steps=4, logging_steps=2, fp16=True, log_layer_grad_norms=True)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    # A small scale puts a measurable share of the (unscaled) gradients below fp16's smallest subnormal.
    emulate_fp16_scaler(trainer, init_scale=2.0**-8)
    capture = GradientCapture(trainer.accelerator.scaler)
    trainer.add_callback(capture)
    trainer.train()

    logged = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    assert sorted(logged) == [2, 4]
    for step, entry in logged.items():
        grads, scale = capture.captured[step]
        flat = torch.cat([g.flatten().double() for g in grads.values()]) * scale
        nonzero = flat[flat != 0].abs()
        # The fp16 backward flushes whole gradients (attention query/key) to zero: they count as underflowed.
        flushed = sum(grad.numel() for grad in grads.values() if not grad.any())
        assert flushed > 0
        expected_fraction = ((nonzero < 2.0**-24).sum().item() + flushed) / (nonzero.numel() + flushed)
        expected_headroom = math.log2(65504.0 / nonzero.max().item())
        assert 0 < expected_fraction < 1
        assert entry["stability/fp16_underflow_fraction"] == pytest.approx(expected_fraction, rel=1e-6)
        assert entry["stability/fp16_headroom_log2"] == pytest.approx(expected_headroom, rel=1e-5)
        for name, grad in grads.items():
            # fp32 sums over up to 64k elements (the embedding) drift by ~sqrt(n) * 2**-24 = 1.5e-5 relative.
            assert entry[f"stability/grad_norm/{name}"] == pytest.approx(grad.double().norm().item(), rel=1e-4)


def test_attach_reuses_an_existing_callback_and_rejects_new_options(tmp_path, bert_tokenizer, dataset):
    existing = LossScaleTelemetryCallback()
    trainer = Trainer(tiny_bert(bert_tokenizer), training_args(tmp_path), train_dataset=dataset, callbacks=[existing])
    assert LossScaleTelemetryCallback.attach(trainer) is existing
    assert sum(isinstance(cb, LossScaleTelemetryCallback) for cb in trainer.callback_handler.callbacks) == 1
    with pytest.raises(TypeError, match="log_layer_grad_norms"):
        LossScaleTelemetryCallback.attach(trainer, log_layer_grad_norms=True)


def test_rollbacks_are_looked_up_in_the_trainer_and_logged(tmp_path, bert_tokenizer, dataset):
    """A NaN-loss batch (no labels) makes the default spike rollback fire; telemetry logs its live count."""
    args = training_args(tmp_path, max_steps=4)
    trainer = StabilityTrainer(
        tiny_bert(bert_tokenizer), args, train_dataset=dataset, data_collator=NoLabelBatches([2])
    )
    trainer.train()
    rollback = find_callback(trainer.callback_handler.callbacks, SpikeRollbackCallback)
    assert rollback.rollbacks >= 1
    logged = [entry["stability/rollbacks"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[:2] == [0, 0] and logged[-1] == rollback.rollbacks


def test_fp16_pressure_counts_gradients_that_flushed_to_zero(bert_tokenizer, dataset):
    # A real fp16 backward with a tiny loss scale: most gradient tensors flush to exactly zero.
    model = tiny_bert(bert_tokenizer).half()
    scale = 2.0**-16
    (model(**default_data_collator([dataset[i] for i in range(8)])).loss * scale).backward()
    grads = [p.grad.float() / scale for p in model.parameters() if p.grad is not None]
    flushed = [g for g in grads if not g.any()]
    assert 0 < len(flushed) < len(grads)

    pressure = fp16_pressure(grads, torch.tensor(scale))

    nonzero = torch.cat([(g[g != 0] * scale).abs().double() for g in grads])
    flushed_elements = sum(g.numel() for g in flushed)
    expected = ((nonzero < 2.0**-24).sum().item() + flushed_elements) / (nonzero.numel() + flushed_elements)
    assert pressure["stability/fp16_underflow_fraction"].item() == pytest.approx(expected, rel=1e-6)
    nonzero_only = (nonzero < 2.0**-24).sum().item() / nonzero.numel()  # what counting nonzero elements alone says
    assert pressure["stability/fp16_underflow_fraction"].item() > nonzero_only
