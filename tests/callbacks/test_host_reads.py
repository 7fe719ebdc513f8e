"""No extra device-to-host read on ordinary steps: `StabilityTrainer` against a plain `Trainer`, read for read.

Counted as `benchmarks/trainer_overhead.py` counts them (every tensor method that copies to the host, made
anywhere while the step runs, Trainer's own included), per optimizer step, with the default optimizer
(``adamw_torch_fused``). Ordinary steps are no logging, save, check or last steps.
"""

from __future__ import annotations

import pytest
from transformers import Trainer, TrainerCallback

from hf_stability import StabilityTrainer
from tests.testing_utils import counting_host_reads, emulate_fp16_scaler, mlm_dataset, tiny_bert, training_args

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


def reads_per_step(trainer_class, output_dir, tokenizer, dataset, regime: str) -> dict[int, int]:
    args = training_args(
        output_dir,
        bf16=regime == "bf16",
        fp16=regime == "fp16",
        logging_steps=100,
        snapshot_interval=100,
        spike_check_interval=100,
    )
    trainer = trainer_class(tiny_bert(tokenizer), args, train_dataset=dataset)
    if regime == "fp16":
        emulate_fp16_scaler(trainer)
    with counting_host_reads() as counts:
        counter = ReadsPerStep(counts)
        trainer.add_callback(counter)
        trainer.train()
    return counter.per_step


@pytest.mark.parametrize("regime", ["fp32", "bf16", "fp16"])
def test_no_extra_host_read_on_ordinary_steps_with_the_default_optimizer(tmp_path, bert_tokenizer, regime):
    dataset = mlm_dataset(bert_tokenizer, rows=64)
    plain = reads_per_step(Trainer, tmp_path / "plain", bert_tokenizer, dataset, regime)
    stability = reads_per_step(StabilityTrainer, tmp_path / "stability", bert_tokenizer, dataset, regime)
    extra = {step: stability[step] - plain[step] for step in ORDINARY}
    assert extra == dict.fromkeys(ORDINARY, 0), f"extra host reads per step: {extra}"
