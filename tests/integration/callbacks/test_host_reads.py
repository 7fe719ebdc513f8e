"""No extra device-to-host read on ordinary steps: `StabilityTrainer` against a plain `Trainer`, read for read; and
the few device ops it adds per ordinary step, op for op.

Counted as `benchmarks/trainer_overhead.py` counts them (every tensor method that copies to the host, made
anywhere while the step runs, Trainer's own included), per optimizer step, with the default optimizer
(``adamw_torch_fused``). Ordinary steps are no logging, save, check or last steps. `StabilityTrainer` records every
micro-batch's dataset indices meanwhile (`hf_stability.samples`): that recording must add no read either.
"""

from __future__ import annotations

from collections import Counter

import pytest
from transformers import Trainer, TrainerCallback

from benchmarks.host_reads import counting_host_reads
from benchmarks.op_counts import counting_ops
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


class CountsPerStep(TrainerCallback):
    """What an instrument counted from the beginning to the end of each optimizer step (forward, backward, update,
    callbacks), by key: host reads by method, or ops by name."""

    def __init__(self, counts: Counter) -> None:
        self.counts = counts
        self.per_step: dict[int, Counter] = {}
        self._start: Counter = Counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = Counter(self.counts)

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step[state.global_step] = Counter(self.counts) - self._start


class RecordedSteps(TrainerCallback):
    """The steps `StabilityTrainer`'s sample record holds at the end of each step: the recording of the dataset
    indices (`hf_stability.samples`) ran while the reads were counted."""

    def __init__(self) -> None:
        self.held: dict[int, list[int]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.held[state.global_step] = StepSignals.for_model(model).samples.steps()


def counted_run(counting, trainer_class, output_dir, tokenizer, dataset, regime: str, model=None, callbacks=None,
                **overrides) -> tuple[dict[int, Counter], Trainer]:
    """Train with ``counting`` (`counting_host_reads` or `counting_ops`) on; its counts per step, and the trainer."""
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
    with counting() as counts:
        counter = CountsPerStep(counts)
        trainer.add_callback(counter)
        trainer.train()
    return counter.per_step, trainer


def reads_per_step(*run, **overrides) -> dict[int, int]:
    """Host reads per step of `counted_run`."""
    per_step, _ = counted_run(counting_host_reads, *run, **overrides)
    return {step: sum(counts.values()) for step, counts in per_step.items()}


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


def ops_per_step(trainer_class, output_dir, regime: str) -> tuple[dict[int, Counter], int]:
    """Per step, the ops of a BART-base-layout step; and the number of the optimizer's parameter groups."""
    per_step, trainer = counted_run(counting_ops, trainer_class, output_dir, None, seq2seq_dataset(rows=32), regime,
                                    bart_layout_model(), per_device_train_batch_size=2)
    return per_step, len(trainer.optimizer.param_groups)


# What the skip decision adds to an ordinary step (`measure_step`, `SkipStage._drop_on_device`): the value vector
# (stack), its non-finite places (sub, ne_), the gradient flag (select). fp16 also writes the reduced flag back into
# the scaler (select, copy_) and keeps a copy of the loss scale for the step's event (clone). Everything else
# (spike, telemetry, sample recording) adds no op to an ordinary step.
DECISION_OPS = {"aten.stack.default": 1, "aten.sub.Tensor": 1, "aten.ne_.Scalar": 1, "aten.select.int": 1}
FP16_DECISION_OPS = {**DECISION_OPS, "aten.select.int": 2, "aten.copy_.default": 1, "aten.clone.default": 1}


@pytest.mark.parametrize("regime", ["fp32", "bf16", "fp16"])
def test_an_ordinary_step_adds_only_the_skip_decisions_few_ops(tmp_path, regime):
    """259 parameter tensors, fused AdamW: a per-tensor op or a walk over the parameters would add 259 ops or more.

    With fp32/bf16 the fused AdamW, handed the flag as ``found_inf``, runs one more ``_foreach_sub_`` per
    parameter group itself (torch's skip arithmetic: one multi-tensor kernel on CUDA); in fp16 the scaler does.
    """
    plain, _ = ops_per_step(Trainer, tmp_path / "plain", regime)
    stability, groups = ops_per_step(StabilityTrainer, tmp_path / "stability", regime)
    for step in ORDINARY[1:]:  # the first step also creates the run's cached zero (`TrainedParameters.zero`)
        added = dict(stability[step] - plain[step])
        assert not plain[step] - stability[step], f"step {step}: ops missing"
        expected = FP16_DECISION_OPS if regime == "fp16" else {**DECISION_OPS, "aten._foreach_sub_.List": groups}
        assert added == expected, f"step {step}: ops added {added}"
