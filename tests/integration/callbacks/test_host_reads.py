"""No extra device-to-host read on ordinary steps: `StabilityTrainer` against a plain `Trainer`, read for read.

Counted as `benchmarks/trainer_overhead.py` counts them (every tensor method that copies to the host, made
anywhere while the step runs, Trainer's own included), per optimizer step, with the default optimizer
(``adamw_torch_fused``). Ordinary steps are no logging, save, check or last steps. `StabilityTrainer` records every
micro-batch's dataset indices meanwhile (`hf_stability.samples`): that recording must add no read either.
"""

from __future__ import annotations

import pytest
from transformers import Trainer, TrainerCallback

from benchmarks.host_reads import counting_host_reads
from hf_stability import LossScaleTelemetryCallback, SkipNonFiniteCallback, SpikeRollbackCallback, StabilityTrainer
from hf_stability.step.channel import StepSignals
from tests.testing_utils import (
    bart_layout_model,
    emulate_fp16_scaler,
    mlm_dataset,
    seq2seq_dataset,
    tiny_bert,
    training_args,
)

ORDINARY = range(1, 6)  # step 6 is the last one: it flushes and checks


class ReadsPerStep(TrainerCallback):
    """Host reads from the beginning to the end of each optimizer step (forward, backward, update, callbacks)."""

    def __init__(self, counts) -> None:
        self.counts = counts
        self.per_step: dict[int, int] = {}
        self._start = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = sum(self.counts.values())

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step[state.global_step] = sum(self.counts.values()) - self._start


class RecordedSteps(TrainerCallback):
    """The steps `StabilityTrainer`'s sample record holds at the end of each step: the recording of the dataset
    indices (`hf_stability.samples`) ran while the reads were counted."""

    def __init__(self) -> None:
        self.held: dict[int, list[int]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.held[state.global_step] = StepSignals.for_model(model).samples.steps()


def reads_per_step(trainer_class, output_dir, tokenizer, dataset, regime: str, model=None, callbacks=None,
                   **overrides) -> dict[int, int]:
    args = training_args(
        output_dir,
        bf16=regime == "bf16",
        fp16=regime == "fp16",
        logging_steps=100,
        snapshot_interval=100,
        spike_check_interval=100,
        **overrides,
    )
    model = tiny_bert(tokenizer) if model is None else model
    trainer = trainer_class(model, args, train_dataset=dataset, callbacks=callbacks)
    if regime == "fp16":
        emulate_fp16_scaler(trainer)
    if trainer_class is Trainer and callbacks:
        LossScaleTelemetryCallback.attach(trainer)
    with counting_host_reads() as counts:
        counter = ReadsPerStep(counts)
        trainer.add_callback(counter)
        trainer.train()
    return counter.per_step


@pytest.mark.parametrize("regime", ["fp32", "bf16", "fp16"])
def test_no_extra_host_read_on_ordinary_steps_with_the_default_optimizer(tmp_path, bert_tokenizer, regime):
    dataset = mlm_dataset(bert_tokenizer, rows=64)
    plain = reads_per_step(Trainer, tmp_path / "plain", bert_tokenizer, dataset, regime)
    recorded = RecordedSteps()
    stability = reads_per_step(StabilityTrainer, tmp_path / "stability", bert_tokenizer, dataset, regime,
                               callbacks=[recorded])
    extra = {step: stability[step] - plain[step] for step in ORDINARY}
    assert extra == dict.fromkeys(ORDINARY, 0), f"extra host reads per step: {extra}"
    assert all(step in recorded.held[step] for step in ORDINARY)  # with the sample recording on


@pytest.mark.parametrize("regime", ["fp32", "bf16", "fp16"])
def test_no_extra_host_read_on_the_bart_base_layout(tmp_path, regime):
    """259 parameter tensors: the skip reuses Trainer's pre-clip norm and checks the cached parameters, on device."""
    dataset = seq2seq_dataset(rows=32)
    plain = reads_per_step(Trainer, tmp_path / "plain", None, dataset, regime, bart_layout_model(),
                           per_device_train_batch_size=2)
    stability = reads_per_step(StabilityTrainer, tmp_path / "stability", None, dataset, regime, bart_layout_model(),
                               per_device_train_batch_size=2)
    extra = {step: stability[step] - plain[step] for step in ORDINARY}
    assert extra == dict.fromkeys(ORDINARY, 0), f"extra host reads per step: {extra}"


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_no_extra_host_read_with_the_callbacks_under_a_plain_trainer(tmp_path, bert_tokenizer, max_grad_norm):
    """A plain Trainer shares no pre-clip norm: the skip measures the gradients itself, still on device."""
    dataset = mlm_dataset(bert_tokenizer, rows=64)
    plain = reads_per_step(Trainer, tmp_path / "plain", bert_tokenizer, dataset, "fp32", max_grad_norm=max_grad_norm)
    callbacks = [SkipNonFiniteCallback(), SpikeRollbackCallback(check_interval=100, snapshot_interval=100)]
    with_callbacks = reads_per_step(Trainer, tmp_path / "callbacks", bert_tokenizer, dataset, "fp32",
                                    callbacks=callbacks, max_grad_norm=max_grad_norm)
    extra = {step: with_callbacks[step] - plain[step] for step in ORDINARY}
    assert extra == dict.fromkeys(ORDINARY, 0), f"extra host reads per step: {extra}"
