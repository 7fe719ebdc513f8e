"""Soak: 2,000 steps of a tiny real BERT with every fault the library answers, mixed, in one run.

Injected (fixed seeds): NaN forward passes on random steps (~1 in 50, as corrupt batches would), two thrown
updates (loss spikes) and one update that makes the weights NaN. The counters must equal what was injected,
the events file must match the counters, the model must end up about as good as an untouched run, and the
process must not grow while it runs (snapshots, the skip queue, the detector buffer and the events leave
nothing behind).
"""

from __future__ import annotations

import ctypes
import gc
import platform
import random

import psutil
import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_stability import SkipNonFiniteCallback, SpikeRollbackCallback, StabilityTrainer, read_events
from hf_stability.callbacks.order import find_callback
from tests.rollback_faults import NanWeights, ThrowWeights
from tests.testing_utils import PoisonActivations, mlm_dataset, tiny_bert, training_args

STEPS = 2000
THROWN = (700, 1400)  # loss spikes: rolled back
BLOWN = 1000  # the update that makes the weights NaN: rolled back, no batch skipped
MEMORY_FROM = 500


def poisoned_steps(seed: int = 0) -> list[int]:
    """~1 in 50 steps (as ``global_step`` before the step), clear of the other faults and their checks."""
    rng = random.Random(seed)
    faults = (*THROWN, BLOWN)
    return sorted(
        step for step in range(STEPS - 1)
        if rng.random() < 1 / 50 and all(not -2 <= step - fault <= 12 for fault in faults)
    )


class ResidentMemory(TrainerCallback):
    """Resident set size of this process at the end of chosen steps, once freed memory is given back.

    Raw RSS also counts the heap pages glibc keeps after ``free``: it swung between 623 and 795 MB from one
    250-step sample to the next in this run, with the Python heap and the live tensors flat, so two raw samples
    could differ by more than 5% with nothing held. After ``gc.collect()`` and ``malloc_trim(0)`` the same samples
    stayed within 515.9-517.1 MB: what is left is what the process holds.
    """

    def __init__(self, steps) -> None:
        self.steps = set(steps)
        self.rss: dict[int, int] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            gc.collect()
            ctypes.CDLL(None).malloc_trim(0)
            self.rss[state.global_step] = psutil.Process().memory_info().rss


def soak_args(output_dir, **overrides):
    return training_args(output_dir, max_steps=STEPS, logging_steps=100, max_grad_norm=0.0, snapshot_interval=50,
                         **overrides)


@pytest.fixture
def one_thread():
    """One torch thread: a tiny model gains nothing from more, and a busy 2-core machine loses a lot."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="measures memory after glibc's malloc_trim")
@pytest.mark.usefixtures("one_thread")
def test_soak_2000_steps_with_poisoned_batches_spikes_and_nonfinite_weights(bert_tokenizer, tmp_path):
    dataset = mlm_dataset(bert_tokenizer, rows=256)
    evaluation = dataset.select(range(64))
    clean = Trainer(tiny_bert(bert_tokenizer), soak_args(tmp_path / "clean"), train_dataset=dataset)
    clean.train()

    poisoned = poisoned_steps()
    memory = ResidentMemory([MEMORY_FROM, STEPS])
    faults = [PoisonActivations(poisoned), ThrowWeights(THROWN), NanWeights([BLOWN]), memory]
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), soak_args(tmp_path / "soak"), train_dataset=dataset,
                               callbacks=faults)
    trainer.train()

    assert trainer.state.global_step == STEPS
    callbacks = trainer.callback_handler.callbacks
    skip = find_callback(callbacks, SkipNonFiniteCallback)
    rollback = find_callback(callbacks, SpikeRollbackCallback)
    assert STEPS / 100 <= len(poisoned) <= STEPS / 25, "about 1 in 50"
    assert skip.skipped_steps == len(poisoned) and rollback.rollbacks == len(THROWN) + 1

    events = read_events(tmp_path / "soak")
    kinds = [e["event"] for e in events]
    assert [e["step"] for e in events if e["event"] == "skip"] == [step + 1 for step in poisoned]
    assert kinds.count("nonfinite_parameters") == skip.nonfinite_parameter_steps >= 1
    assert kinds.count("rollback") == rollback.rollbacks and "stop" not in kinds
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert [(e["spike_step"], e["nonfinite_weights"]) for e in rollbacks] == [
        (THROWN[0] + 1, False), (BLOWN + 1, True), (THROWN[1] + 1, False)]
    logged = [entry for entry in trainer.state.log_history if "stability/skipped_steps" in entry][-1]
    assert (logged["stability/skipped_steps"], logged["stability/rollbacks"]) == (len(poisoned), rollback.rollbacks)

    clean_loss = clean.evaluate(evaluation)["eval_loss"]
    soak_loss = trainer.evaluate(evaluation)["eval_loss"]
    assert soak_loss < 2 * clean_loss, (soak_loss, clean_loss)
    growth = memory.rss[STEPS] / memory.rss[MEMORY_FROM] - 1
    assert growth < 0.02, f"resident memory grew {growth:.1%} from step {MEMORY_FROM} to {STEPS}"
