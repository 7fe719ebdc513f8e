"""`SpikeRollbackCallback` under the real `Trainer`: a bad update at a known step, a tiny real BERT.

The fault: during the update of one optimizer step, `ThrowWeights` (``tests/rollback_faults.py``) adds
N(0, 2²) noise to every parameter, as a diverging update would. The loss of the next step jumps by an
order of magnitude, far above mean + 6σ of the healthy window.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import (
    BertForMaskedLM,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_stability import (
    SkipNonFiniteCallback,
    SpikeRollbackCallback,
    StabilityConfig,
    StabilityTrainer,
    read_events,
)
from hf_stability.callbacks.order import find_callback
from hf_stability.collators import DataCollatorForT5SpanCorruption
from hf_stability.step.channel import StepSignals
from tests.rollback_faults import NanWeights, ThrowWeights
from tests.testing_utils import (
    PoisonActivations,
    emulate_fp16_scaler,
    mlm_dataset,
    run_two_ranks,
    tiny_bert,
    training_args,
)


class Recorder(TrainerCallback):
    """Records, independently of the callback under test, what a rollback must bring back.

    At the start and at every ``every``-th step end: parameters, optimizer state and last LR. At every
    step end: the last LR. When ``watch.rollbacks`` grows during a step: the state right after the restore.
    """

    def __init__(self, watch: SpikeRollbackCallback, every: int) -> None:
        self.watch = watch
        self.every = every
        self.saved: dict[int, tuple[dict, dict, list[float]]] = {}
        self.after_rollback: list[tuple[int, tuple[dict, dict, list[float]]]] = []
        self.lrs: dict[int, float] = {}
        self._rollbacks = 0

    @staticmethod
    def _capture(model, optimizer, lr_scheduler):
        parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
        return parameters, copy.deepcopy(optimizer.state_dict()["state"]), list(lr_scheduler.get_last_lr())

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.saved[state.global_step] = self._capture(model, optimizer, lr_scheduler)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.lrs[state.global_step] = lr_scheduler.get_last_lr()[0]
        if self.watch.rollbacks > self._rollbacks:
            self._rollbacks = self.watch.rollbacks
            self.after_rollback.append((state.global_step, self._capture(model, optimizer, lr_scheduler)))
        elif state.global_step % self.every == 0:
            self.saved[state.global_step] = self._capture(model, optimizer, lr_scheduler)


def make_args(output_dir, args_class=TrainingArguments, **overrides) -> TrainingArguments:
    """`training_args` for 300 steps, logging every 25, without clipping by default.

    Clipping would soften the thrown update; the fault must be unmistakable.
    """
    settings = {"max_steps": 300, "logging_steps": 25, "max_grad_norm": 0.0, **overrides}
    return training_args(output_dir, args_class=args_class, **settings)


def rollback_callback(trainer: Trainer) -> SpikeRollbackCallback:
    """Looked up in the handler: on resume Trainer replaces callback objects with restored copies."""
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, SpikeRollbackCallback)]
    return callback


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=256)


@pytest.fixture(scope="module")
def clean_run(bert_tokenizer, dataset, tmp_path_factory):
    """300 clean steps watched by the callback with its default detector (window 128, warm-up 64, 6σ)."""
    output_dir = tmp_path_factory.mktemp("clean")
    callback = SpikeRollbackCallback(snapshot_interval=50)
    recorder = Recorder(callback, every=50)
    trainer = Trainer(tiny_bert(bert_tokenizer), make_args(output_dir), train_dataset=dataset,
                      callbacks=[callback, recorder])
    trainer.train()
    return trainer, recorder, output_dir


@pytest.mark.slow
def test_no_false_alarm_on_300_clean_steps_with_default_detector(clean_run):
    trainer, _, output_dir = clean_run
    assert rollback_callback(trainer).rollbacks == 0
    assert read_events(output_dir) == []
    assert trainer.state.global_step == 300


@pytest.mark.slow
def test_no_false_alarm_on_300_clean_steps_of_t5_span_corruption(t5_tokenizer, corpus, tmp_path):
    # Fresh span-corruption noise in every batch makes this loss noisier than BERT's fixed masks above.
    stream = [i for text in corpus for i in t5_tokenizer(text, add_special_tokens=False).input_ids]
    rows = [stream[start : start + 60] for start in range(0, len(stream) - 60, 60)][:512]
    config = T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1,
                      num_heads=2, pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id,
                      decoder_start_token_id=t5_tokenizer.pad_token_id)
    torch.manual_seed(0)
    callback = SpikeRollbackCallback(snapshot_interval=50)
    trainer = Trainer(T5ForConditionalGeneration(config), make_args(tmp_path), train_dataset=Dataset.from_dict(
        {"input_ids": rows}), data_collator=DataCollatorForT5SpanCorruption(t5_tokenizer, seed=0), callbacks=[callback])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 300 and losses[-1] < losses[0], "a real run, learning"
    assert callback.rollbacks == 0 and read_events(tmp_path) == []


@pytest.mark.slow
def test_a_thrown_update_triggers_exactly_one_exact_rollback_with_lr_cut(bert_tokenizer, dataset, clean_run, tmp_path):
    clean_trainer, clean_recorder, _ = clean_run
    throw_at = 150
    callback = SpikeRollbackCallback(snapshot_interval=50, lr_factor=0.5)
    recorder = Recorder(callback, every=50)
    trainer = Trainer(tiny_bert(bert_tokenizer), make_args(tmp_path), train_dataset=dataset,
                      callbacks=[callback, ThrowWeights([throw_at]), recorder])
    trainer.train()

    events = read_events(tmp_path)
    assert [e["event"] for e in events] == ["rollback"] and callback.rollbacks == 1
    event = events[0]
    # The update of step 150 is thrown, so the loss of step 151 (measured before its own update) spikes.
    assert event["spike_step"] == throw_at + 1 and event["value"] > event["threshold"]
    # The snapshot of step 150 holds the thrown update and was never trusted: step 100's is restored.
    assert event["restored_step"] == 100
    rollback_step, (parameters, optimizer_state, last_lr) = recorder.after_rollback[0]
    assert rollback_step == event["step"] and throw_at < rollback_step <= throw_at + 10

    saved_parameters, saved_optimizer_state, saved_lr = recorder.saved[event["restored_step"]]
    for name, value in saved_parameters.items():
        assert torch.equal(parameters[name], value), f"parameter {name} differs from step 100's"
    for index, entries in saved_optimizer_state.items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(optimizer_state[index][key]), torch.as_tensor(value)), (index, key)
    # LR: halved right after the restore, and the scheduler keeps it halved (its base_lrs were scaled).
    assert last_lr == pytest.approx([0.5 * lr for lr in saved_lr], rel=1e-12)
    assert recorder.lrs[rollback_step + 1] == pytest.approx(0.5 * clean_recorder.lrs[event["restored_step"] + 1])

    # global_step and the logged history never go back.
    logged_steps = [entry["step"] for entry in trainer.state.log_history]
    assert logged_steps == sorted(logged_steps) and trainer.state.global_step == 300

    # Without the rollback the thrown run stays far off (training loss ~70 vs ~5 at step 300 in the same setup),
    # so this bound fails if the restore or the continuation is wrong.
    evaluation = dataset.select(range(64))
    clean_loss = clean_trainer.evaluate(evaluation)["eval_loss"]
    recovered_loss = trainer.evaluate(evaluation)["eval_loss"]
    assert recovered_loss < 2 * clean_loss


def test_grad_norm_metric_catches_the_thrown_update(bert_tokenizer, dataset, tmp_path):
    callback = SpikeRollbackCallback(metric="grad_norm", window=32, warmup=16, snapshot_interval=10)
    trainer = Trainer(tiny_bert(bert_tokenizer), make_args(tmp_path, max_steps=60), train_dataset=dataset,
                      callbacks=[callback, ThrowWeights([40])])
    trainer.train()
    (event,) = read_events(tmp_path)
    assert event["metric"] == "grad_norm" and event["spike_step"] == 41 and event["restored_step"] == 30


def test_grad_norm_metric_sees_the_pre_clip_norm_under_stability_trainer(bert_tokenizer, dataset, tmp_path, caplog):
    # Healthy norms here are ~1.5-3, so with max_grad_norm=1 the clipped norm is always 1: flat, spike or not.
    config = dict(max_steps=50, max_grad_norm=1.0, logging_steps=1, spike_metric="grad_norm", spike_window=32,
                  spike_warmup=16, snapshot_interval=10, skip_nonfinite=False)
    args = make_args(tmp_path, StabilityConfig, **config)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset, callbacks=[ThrowWeights([40])])
    trainer.train()
    (event,) = read_events(tmp_path)
    assert event["metric"] == "grad_norm" and event["spike_step"] == 41 and event["restored_step"] == 30
    logged = {entry["step"]: entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry}
    assert event["value"] == pytest.approx(logged[41], rel=1e-6) and event["value"] > 10 * args.max_grad_norm
    assert "clipped norm" not in caplog.text

    # A plain Trainer gives callbacks no pre-clip norm: the callback falls back to the clipped one, and says so.
    plain = Trainer(tiny_bert(bert_tokenizer), make_args(tmp_path / "plain", max_steps=3, max_grad_norm=1.0),
                    train_dataset=dataset, callbacks=[SpikeRollbackCallback(metric="grad_norm")])
    plain.train()
    assert caplog.text.count("it sees the clipped norm") == 1


def test_grad_norm_metric_leaves_fp16_overflows_to_the_grad_scaler(bert_tokenizer, dataset, tmp_path):
    # A 2^40 initial loss scale overflows the first steps; the scaler skips them and halves its scale.
    # Their non-finite norm must not count as a spike (the detector would otherwise fire at step 1).
    callback = SpikeRollbackCallback(metric="grad_norm", window=16, warmup=8, snapshot_interval=10)
    trainer = Trainer(tiny_bert(bert_tokenizer), make_args(tmp_path, max_steps=30, fp16=True, optim="adamw_torch"),
                      train_dataset=dataset, callbacks=[callback])
    emulate_fp16_scaler(trainer, init_scale=2.0**40)
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() < 2.0**30, "the scaler should have met overflows and backed off"
    assert callback.rollbacks == 0 and read_events(tmp_path) == []


def test_a_nan_step_rolls_back_alone_but_feeds_nothing_once_the_skip_callback_skipped_it(
    bert_tokenizer, dataset, tmp_path
):
    # The forward pass of step 31 turns NaN (loss and gradients alike), as a corrupt batch would.
    def run(output_dir, callbacks):
        trainer = Trainer(tiny_bert(bert_tokenizer), make_args(output_dir, max_steps=40), train_dataset=dataset,
                          callbacks=[*callbacks, PoisonActivations([30])])
        trainer.train()
        return read_events(output_dir)

    alone = run(tmp_path / "alone", [SpikeRollbackCallback(window=16, warmup=8, snapshot_interval=10)])
    assert [(e["event"], e["spike_step"], e["restored_step"]) for e in alone] == [("rollback", 31, 20)]
    # Without the skip callback the NaN batch's update turned every weight NaN (clipping multiplies by max/NaN):
    # the event says so, and names the step whose loss showed it first.
    assert alone[0]["nonfinite_weights"] and "loss spike first at step 31" in alone[0]["reason"]

    together = run(tmp_path / "together", [SkipNonFiniteCallback(),
                                           SpikeRollbackCallback(window=16, warmup=8, snapshot_interval=10)])
    assert [(e["event"], e["step"]) for e in together] == [("skip", 31)]


def test_an_fp16_overflow_still_pending_on_device_feeds_nothing_to_the_loss_detector(
    bert_tokenizer, dataset, tmp_path
):
    # Step 31's forward turns NaN: NaN loss and gradients, an overflow for the grad scaler. No logging or flush
    # step comes before step 40, so the skip decision reaches the rollback callback as a device flag.
    flags = {}

    class Observer(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            flags[state.global_step + 1] = StepSignals.for_model(model).skip_flag(state.global_step + 1)

    def run(output_dir, callbacks):
        args = make_args(output_dir, max_steps=40, logging_steps=100, fp16=True)
        trainer = Trainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset,
                          callbacks=[*callbacks, PoisonActivations([30]), Observer()])
        emulate_fp16_scaler(trainer)
        trainer.train()
        return read_events(output_dir)

    # Without the skip callback the NaN loss is a spike (the detector can fail this test).
    alone = run(tmp_path / "alone", [SpikeRollbackCallback(window=16, warmup=8, snapshot_interval=10)])
    assert [(e["event"], e["spike_step"]) for e in alone] == [("rollback", 31)]

    rollback = SpikeRollbackCallback(window=16, warmup=8, snapshot_interval=10)
    together = run(tmp_path / "together", [SkipNonFiniteCallback(), rollback])
    assert isinstance(flags[31], torch.Tensor) and bool(flags[31]), "the skip should still be pending on device"
    assert [(e["event"], e["step"], e["reason"]) for e in together] == [("skip", 31, "fp16_overflow")]
    assert rollback.rollbacks == 0


def test_max_rollbacks_stops_with_a_checkpoint_and_resume_keeps_the_count(bert_tokenizer, dataset, tmp_path):
    config = dict(max_steps=80, save_strategy="steps", save_steps=1000, snapshot_interval=10, spike_window=32,
                  spike_warmup=16, max_rollbacks=1, rollback_lr_factor=0.5)
    args = make_args(tmp_path, StabilityConfig, **config)
    trainer = Trainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset,
                      callbacks=[SpikeRollbackCallback(), ThrowWeights([30, 60])])
    trainer.train()

    events = read_events(tmp_path)
    assert [(e["event"], e["spike_step"]) for e in events] == [("rollback", 31), ("stop", 61)]
    stopped_at = events[1]["step"]
    assert trainer.state.global_step == stopped_at < 80
    checkpoint = tmp_path / f"checkpoint-{stopped_at}"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()

    # Resume for a few more clean steps: the count and the LR scale come back, no new event is written.
    resumed = Trainer(tiny_bert(bert_tokenizer, seed=1), args, train_dataset=dataset,
                      callbacks=[SpikeRollbackCallback()])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    restored = rollback_callback(resumed)
    assert restored.rollbacks == 1 and restored.lr_scale == 0.5
    assert len(read_events(tmp_path)) == 2


def test_resume_restores_the_detector_window_so_a_spike_right_after_it_rolls_back(
    bert_tokenizer, dataset, tmp_path
):
    config = dict(save_strategy="steps", save_steps=1000, snapshot_interval=10, spike_window=32, spike_warmup=16)
    first = Trainer(tiny_bert(bert_tokenizer), make_args(tmp_path, StabilityConfig, max_steps=40, **config),
                    train_dataset=dataset, callbacks=[SpikeRollbackCallback()])
    first.train()
    window = rollback_callback(first).state()["attributes"]["detector_window"]
    assert len(window) == 32 and all(0 < value < 10 for value in window)
    saved = json.loads((tmp_path / "checkpoint-40" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["SpikeRollbackCallback"]["attributes"]["detector_window"] == window

    # Thrown at step 45, five steps after the resume: a fresh detector would still be warming up (16 values).
    resumed = Trainer(tiny_bert(bert_tokenizer, seed=1), make_args(tmp_path, StabilityConfig, max_steps=60, **config),
                      train_dataset=dataset, callbacks=[SpikeRollbackCallback(), ThrowWeights([45])])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-40"))
    assert [(e["event"], e["spike_step"], e["restored_step"]) for e in read_events(tmp_path)] == [("rollback", 46, 40)]


class LossReadings(StabilityTrainer):
    """Adds ``offsets[step]`` (a constant, so the gradient is untouched) to the training loss of ``step``.

    A finite outlier reading or a spiking loss, as the detector sees it, without changing what is trained.
    """

    offsets: dict[int, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        step = self.state.global_step + 1
        if model.training and step in self.offsets:
            loss = loss + self.offsets[step](loss.detach())
        return (loss, *result[1:]) if return_outputs else loss


def test_a_huge_finite_loss_during_warmup_does_not_hide_a_later_20x_spike(bert_tokenizer, dataset, tmp_path):
    """Step 4's loss reads 1e29 while the detector warms up (16 values); step 30's loss is 20x the healthy one."""
    trainer = LossReadings(tiny_bert(bert_tokenizer), make_args(tmp_path, StabilityConfig, max_steps=34,
                           logging_steps=1, snapshot_interval=10, spike_window=32, spike_warmup=16),
                           train_dataset=dataset)
    trainer.offsets = {4: lambda loss: 1e29 - loss, 30: lambda loss: 19 * loss}
    trainer.train()
    assert [entry["loss"] for entry in trainer.state.log_history if entry.get("step") == 4] == [pytest.approx(1e29)]
    (event,) = read_events(tmp_path)
    assert (event["event"], event["spike_step"]) == ("rollback", 30) and event["restored_step"] < 30
    assert event["threshold"] < 20  # the bar stays near the healthy loss (~7), not ~4e29


@pytest.mark.parametrize(
    ("save", "thrown", "saved_at"),
    [
        # Checks every 10 steps; the step-35 save comes between the checks of steps 30 and 40.
        ({"save_strategy": "steps", "save_steps": 35}, 33, 35),
        # 256 rows / batch 8: the epoch, and its checkpoint, end at step 32.
        ({"save_strategy": "epoch"}, 31, 32),
    ],
    ids=["steps", "epoch"],
)
def test_a_spike_between_checks_is_judged_before_the_checkpoint_is_written(
    bert_tokenizer, dataset, tmp_path, save, thrown, saved_at
):
    args = make_args(tmp_path, max_steps=40, **save)
    trainer = Trainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset,
                      callbacks=[SpikeRollbackCallback(window=16, warmup=8, snapshot_interval=10),
                                 ThrowWeights([thrown])])
    trainer.train()
    # Step 30's snapshot is not trusted yet (10 healthy steps must follow it): step 20's is restored.
    events = [(e["event"], e["step"], e["restored_step"]) for e in read_events(tmp_path)]
    assert events == [("rollback", saved_at, 20)]
    saved = BertForMaskedLM.from_pretrained(tmp_path / f"checkpoint-{saved_at}")
    loss = Trainer(saved, args).evaluate(mlm_dataset(bert_tokenizer, rows=32))["eval_loss"]
    assert loss < 10, f"checkpoint-{saved_at} holds the thrown weights (eval loss {loss:.1f})"


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="metric"):
        SpikeRollbackCallback(metric="accuracy")
    with pytest.raises(ValueError, match="lr_factor"):
        SpikeRollbackCallback(lr_factor=0.0)
    with pytest.raises(ValueError, match="check_interval"):
        SpikeRollbackCallback(check_interval=0)
    with pytest.raises(ValueError, match="warmup"):
        SpikeRollbackCallback(window=8, warmup=16)


@pytest.mark.distributed
def test_two_ranks_roll_back_together_and_stay_identical(tmp_path):
    run_two_ranks("tests.scripts.rollback_two_ranks", tmp_path, timeout=600)
    events = read_events(tmp_path)
    assert [(e["event"], e["restored_step"]) for e in events] == [("rollback", 20)], "one event, from rank 0"
    assert "spike on another rank" in events[0]["reason"]  # only rank 1's weights were thrown
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0), "ranks diverged after the rollback"


def saved_checkpoints(output_dir) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in Path(output_dir).glob("checkpoint-*"))


def all_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("regime", "logging_steps"), [("fp32", 25), ("bf16", 25), ("fp16", 1), ("fp16", 100)],
    ids=["fp32", "bf16", "fp16-flag-read-per-step", "fp16-flags-queued"],
)
def test_nonfinite_weights_roll_back_like_a_spike_not_skipped_as_bad_batches(
    bert_tokenizer, dataset, tmp_path, regime, logging_steps
):
    # The update of step 25 makes the weights NaN; every later loss and gradient is NaN, whatever the batch.
    config = dict(max_steps=40, logging_steps=logging_steps, snapshot_interval=10, spike_window=16, spike_warmup=8,
                  rollback_lr_factor=0.5, bf16=regime == "bf16", fp16=regime == "fp16")
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), make_args(tmp_path, StabilityConfig, **config),
                               train_dataset=dataset, callbacks=[NanWeights([25])])
    if regime == "fp16":
        emulate_fp16_scaler(trainer)
    trainer.train()

    skip = find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback)
    rollback = rollback_callback(trainer)
    assert skip.skipped_steps == 0, "steps with non-finite weights are no skipped batches"
    assert rollback.rollbacks == 1 and rollback.lr_scale == 0.5
    events = read_events(tmp_path)
    (event,) = [e for e in events if e["event"] == "rollback"]
    # Step 20's snapshot awaits the check of step 30 to be trusted: step 10's is restored.
    assert (event["spike_step"], event["restored_step"], event["nonfinite_weights"]) == (26, 10, True)
    assert event["reason"].startswith("non-finite weights")
    # Read per step (fp16 logging every step), the flags find the weights at step 26 and the rollback happens
    # there; queued (fp32/bf16 with the fused AdamW's found_inf, fp16 with the scaler, between flushes), the
    # rollback comes at the next check (step 30), and every step until then is reported, none skipped.
    assert event["step"] == (26 if logging_steps == 1 else 30)
    reported = [e["step"] for e in events if e["event"] == "nonfinite_parameters"]
    assert reported == list(range(26, event["step"] + 1)) and skip.nonfinite_parameter_steps == len(reported)
    assert {e["event"] for e in events} == {"nonfinite_parameters", "rollback"}
    assert trainer.state.global_step == 40 and all_finite(trainer.model)


def test_rollback_alone_never_writes_a_checkpoint_with_nonfinite_weights(bert_tokenizer, dataset, tmp_path):
    # The update of the checkpoint step itself makes the weights NaN: no loss has shown it when the save is due.
    args = make_args(tmp_path, max_steps=30, save_strategy="steps", save_steps=25, save_total_limit=1)
    trainer = Trainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset,
                      callbacks=[SpikeRollbackCallback(window=16, warmup=8, snapshot_interval=10), NanWeights([25])])
    trainer.train()
    (event,) = read_events(tmp_path)
    assert (event["event"], event["step"], event["restored_step"], event["nonfinite_weights"]) == (
        "rollback", 25, 10, True)
    assert saved_checkpoints(tmp_path) == [30]
    assert all_finite(BertForMaskedLM.from_pretrained(tmp_path / "checkpoint-30"))


def test_the_update_a_checkpoint_holds_is_judged_by_the_next_step_and_replaced_when_it_spiked(
    bert_tokenizer, dataset, tmp_path
):
    # Step 25's update is thrown and saved in checkpoint-25 before any loss could show it; step 26's loss does.
    args = make_args(tmp_path, max_steps=40, save_strategy="steps", save_steps=25)
    trainer = Trainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset,
                      callbacks=[SpikeRollbackCallback(window=16, warmup=8, snapshot_interval=10), ThrowWeights([25])])
    trainer.train()
    (event,) = read_events(tmp_path)
    assert (event["event"], event["step"], event["spike_step"], event["restored_step"]) == ("rollback", 26, 26, 10)
    assert event["removed_checkpoint"] == "checkpoint-25"
    # The thrown checkpoint is gone; the restored state was saved in its place, and no checkpoint holds the throw.
    assert saved_checkpoints(tmp_path) == [26, 40]
    evaluation = mlm_dataset(bert_tokenizer, rows=32)
    for step in (26, 40):
        loss = Trainer(BertForMaskedLM.from_pretrained(tmp_path / f"checkpoint-{step}"), args).evaluate(evaluation)
        assert loss["eval_loss"] < 10, f"checkpoint-{step} holds the thrown weights"


def test_a_resume_whose_first_loss_spikes_stops_at_once_naming_an_earlier_checkpoint(
    bert_tokenizer, dataset, tmp_path
):
    # The last step's update is thrown: nothing is left to judge it, so checkpoint-30 holds it.
    config = dict(save_strategy="steps", save_steps=10, snapshot_interval=10, spike_window=16, spike_warmup=8)
    first = Trainer(tiny_bert(bert_tokenizer), make_args(tmp_path, StabilityConfig, max_steps=30, **config),
                    train_dataset=dataset, callbacks=[SpikeRollbackCallback(), ThrowWeights([30])])
    first.train()
    assert read_events(tmp_path) == [] and saved_checkpoints(tmp_path) == [10, 20, 30]

    resumed = Trainer(tiny_bert(bert_tokenizer, seed=1), make_args(tmp_path, StabilityConfig, max_steps=60, **config),
                      train_dataset=dataset, callbacks=[SpikeRollbackCallback()])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-30"))
    (stop,) = read_events(tmp_path)
    assert (stop["event"], stop["spike_step"]) == ("stop", 31)
    assert str(tmp_path / "checkpoint-20") in stop["reason"]
    assert rollback_callback(resumed).rollbacks == 0, "no rollback to the state that spiked"
    assert resumed.state.global_step == 31 and saved_checkpoints(tmp_path) == [10, 20, 30]


@pytest.mark.distributed
def test_two_ranks_roll_back_together_when_one_rank_has_nonfinite_weights(tmp_path):
    run_two_ranks("tests.scripts.nonfinite_two_ranks", tmp_path, timeout=600)
    events = read_events(tmp_path)
    assert [(e["event"], e["restored_step"]) for e in events if e["event"] != "nonfinite_parameters"] == [
        ("rollback", 10)], "one rollback, written by rank 0"
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    assert rollback["nonfinite_weights"] and not [e for e in events if e["event"] == "skip"]
    # The fused default optimizer keeps the flags on device: the steps from NaN weights are reported at the flush.
    assert {tuple(e["ranks"]) for e in events if e["event"] == "nonfinite_parameters"} == {(1,)}
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0), "ranks diverged after the rollback"
    assert all(torch.isfinite(value).all() for value in rank0.values())
