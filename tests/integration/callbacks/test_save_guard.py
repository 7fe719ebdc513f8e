"""Every checkpoint checked whoever asks for it; more than one trainer, more than one ``train()`` (issue 17).

Real tiny BERT, the real Trainer, real faults: `NanWeights` / `ThrowWeights` (``tests/rollback_faults.py``) spoil the
update of a known step, `PoisonGradient` gives a step an infinite gradient.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertForMaskedLM, Trainer

from hf_stability import SkipNonFiniteCallback, SpikeRollbackCallback, StabilityTrainer, read_events
from hf_stability.callbacks.order import find_callback
from tests.rollback_faults import NanWeights, SaveAt, ThrowWeights
from tests.testing_utils import PoisonGradient, mlm_dataset, run_two_ranks, tiny_bert, training_args

DETECTOR = dict(spike_window=16, spike_warmup=8, snapshot_interval=10, max_grad_norm=0.0)


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=256)


def saved_checkpoints(output_dir) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in Path(output_dir).glob("checkpoint-*"))


def finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class OwnSaveTrainer(StabilityTrainer):
    """A subclass whose ``_save_checkpoint`` never calls ``super()`` (it calls Trainer's directly)."""

    def _save_checkpoint(self, model, trial):
        Trainer._save_checkpoint(self, model, trial)


@pytest.mark.parametrize("trainer_class", [Trainer, StabilityTrainer, OwnSaveTrainer])
def test_a_save_asked_by_a_later_user_callback_never_writes_nonfinite_weights(
    bert_tokenizer, dataset, tmp_path, trainer_class
):
    # Step 25's update turns the weights NaN, and a user callback (after the stability ones) asks for checkpoint-25.
    args = training_args(tmp_path, max_steps=40, save_strategy="steps", save_steps=10, save_total_limit=1, **DETECTOR)
    protections = [SkipNonFiniteCallback()] if trainer_class is Trainer else []  # StabilityTrainer: skip + rollback
    trainer = trainer_class(tiny_bert(bert_tokenizer), args, train_dataset=dataset,
                            callbacks=[*protections, NanWeights([25]), SaveAt([25])])
    trainer.train()
    events = read_events(tmp_path)
    if trainer_class is Trainer:  # nothing restores the weights: stop, and the last finite checkpoint stays
        assert trainer.state.global_step == 25 and [e["event"] for e in events] == ["nonfinite_parameters", "stop"]
        assert saved_checkpoints(tmp_path) == [20]
    else:  # rolled back at the write: the restored state is what checkpoint-25 holds
        (rollback,) = [e for e in events if e["event"] == "rollback"]
        assert (rollback["step"], rollback["restored_step"], rollback["nonfinite_weights"]) == (25, 10, True)
        assert trainer.state.global_step == 40 and saved_checkpoints(tmp_path) == [40]
    for step in saved_checkpoints(tmp_path):
        assert finite(BertForMaskedLM.from_pretrained(tmp_path / f"checkpoint-{step}"))


def test_save_strategy_best_never_writes_nonfinite_weights(bert_tokenizer, dataset, tmp_path):
    # Step 10's update turns the weights NaN; its evaluation is the first, and its metric one that NaN weights do not
    # spoil (the evaluation's runtime), so "best" decides to save right after it, past every callback's on_step_end.
    args = training_args(tmp_path, max_steps=20, save_strategy="best", eval_strategy="steps", eval_steps=10,
                         metric_for_best_model="runtime", greater_is_better=False)
    trainer = Trainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset,
                      eval_dataset=mlm_dataset(bert_tokenizer, rows=16),
                      callbacks=[SkipNonFiniteCallback(), NanWeights([10])])
    trainer.train()
    assert [e["event"] for e in read_events(tmp_path)] == ["nonfinite_parameters", "stop"]
    assert trainer.state.global_step == 10 and saved_checkpoints(tmp_path) == []


def test_save_model_refuses_nonfinite_weights(bert_tokenizer, dataset, tmp_path):
    trainer = Trainer(tiny_bert(bert_tokenizer), training_args(tmp_path, max_steps=3), train_dataset=dataset,
                      callbacks=[SkipNonFiniteCallback(), NanWeights([3])])
    trainer.train()
    with pytest.raises(ValueError, match="non-finite"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()


def test_replacing_the_best_checkpoint_keeps_the_best_model(bert_tokenizer, dataset, tmp_path):
    # Step 20's update is thrown, saved in checkpoint-20 and judged by step 21's loss. The metric (eval loss, greater
    # is better here) makes checkpoint-20 Trainer's best: a metric the spike does not spoil, as a real one may be.
    args = training_args(tmp_path, max_steps=30, save_strategy="steps", save_steps=20, eval_strategy="steps",
                         eval_steps=20, load_best_model_at_end=True, metric_for_best_model="loss",
                         greater_is_better=True, **DETECTOR)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset,
                               eval_dataset=mlm_dataset(bert_tokenizer, rows=16), callbacks=[ThrowWeights([20])])
    trainer.train()
    (rollback,) = read_events(tmp_path)
    assert (rollback["event"], rollback["spike_step"], rollback["removed_checkpoint"]) == ("rollback", 21, None)
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-20" and best.is_dir() and saved_checkpoints(tmp_path) == [20, 21, 30]
    saved = BertForMaskedLM.from_pretrained(best)
    for name, parameter in saved.named_parameters():  # load_best_model_at_end loaded it
        assert torch.equal(parameter, dict(trainer.model.named_parameters())[name]), name


def test_two_stability_trainers_on_one_model_each_judge_their_own_run(bert_tokenizer, dataset, tmp_path):
    # A second trainer built on the same model (a second phase) must not silence the first one's protections.
    model = tiny_bert(bert_tokenizer)
    first = StabilityTrainer(model, training_args(tmp_path / "one", max_steps=40, **DETECTOR), train_dataset=dataset,
                             callbacks=[ThrowWeights([25])])
    second = StabilityTrainer(model, training_args(tmp_path / "two", max_steps=40, **DETECTOR), train_dataset=dataset,
                              callbacks=[ThrowWeights([25])])
    first.train()
    second.train()
    for trainer, name in ((first, "one"), (second, "two")):
        (rollback,) = read_events(tmp_path / name)
        assert (rollback["event"], rollback["spike_step"]) == ("rollback", 26)
        assert find_callback(trainer.callback_handler.callbacks, SpikeRollbackCallback).rollbacks == 1


def test_a_second_trainer_on_one_model_keeps_the_first_ones_callback_settings(bert_tokenizer, dataset, tmp_path):
    # The first trainer's callback is given a short warm-up; a second trainer on the same model gives the defaults
    # (warm-up 64), which would see nothing at step 26.
    model = tiny_bert(bert_tokenizer)
    given = SpikeRollbackCallback(window=16, warmup=8, snapshot_interval=10)
    first = Trainer(model, training_args(tmp_path / "one", max_steps=40, max_grad_norm=0.0), train_dataset=dataset,
                    callbacks=[given, ThrowWeights([25])])
    Trainer(model, training_args(tmp_path / "two", max_steps=40), train_dataset=dataset,
            callbacks=[SpikeRollbackCallback()])
    first.train()
    assert given.settings.spike_warmup == 8
    (rollback,) = read_events(tmp_path / "one")
    assert (rollback["event"], rollback["spike_step"]) == ("rollback", 26)


class BypassingTrainer(StabilityTrainer):
    """A subclass whose ``training_step`` never calls ``super()`` (it calls Trainer's directly)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        return Trainer.training_step(self, model, inputs, num_items_in_batch)


def test_a_subclass_training_step_without_super_still_feeds_the_loss(bert_tokenizer, dataset, tmp_path):
    trainer = BypassingTrainer(tiny_bert(bert_tokenizer), training_args(tmp_path, max_steps=40, **DETECTOR),
                               train_dataset=dataset, callbacks=[ThrowWeights([25])])
    trainer.train()
    (rollback,) = read_events(tmp_path)
    assert (rollback["event"], rollback["spike_step"], rollback["restored_step"]) == ("rollback", 26, 10)


def test_a_second_train_is_a_fresh_run_in_every_part(bert_tokenizer, dataset, tmp_path):
    # Both runs: an infinite gradient at step 5, a thrown update at step 25; one rollback allowed per run.
    args = training_args(tmp_path, max_steps=40, rollback_lr_factor=0.5, max_rollbacks=1, **DETECTOR)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset,
                               callbacks=[PoisonGradient([4]), ThrowWeights([25])])
    runs = []
    for _ in range(2):
        trainer.train()
        skip = find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback)
        rollback = find_callback(trainer.callback_handler.callbacks, SpikeRollbackCallback)
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        runs.append((skip.skipped_steps, rollback.rollbacks, rollback.lr_scale, trainer.state.global_step,
                     logged[-1]["stability/skipped_steps"], logged[-1]["stability/rollbacks"],
                     logged[0]["learning_rate"], [(e["event"], e["step"]) for e in read_events(tmp_path)]))
    first, second = runs
    assert first[:6] == (1, 1, 0.5, 40, 1, 1)
    assert second == first, "the second train() starts where a fresh one would: counts, budget, LR and events"


@pytest.mark.distributed
def test_two_ranks_roll_back_together_at_a_user_requested_save_when_one_rank_has_nonfinite_weights(tmp_path):
    run_two_ranks("tests.scripts.save_two_ranks", tmp_path, timeout=600)
    (rollback,) = [e for e in read_events(tmp_path) if e["event"] == "rollback"]
    assert (rollback["step"], rollback["restored_step"], rollback["nonfinite_weights"]) == (25, 10, True)
    assert saved_checkpoints(tmp_path) == [25] and finite(BertForMaskedLM.from_pretrained(tmp_path / "checkpoint-25"))
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0), "ranks diverged after the rollback"
