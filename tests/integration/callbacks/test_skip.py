"""SkipNonFiniteCallback on real tiny BERT runs: a poisoned step changes nothing, the run goes on."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback

from benchmarks.host_reads import counting_host_reads
from hf_stability import SkipNonFiniteCallback, StabilityTrainer, read_events
from hf_stability.callbacks.order import find_callback
from hf_stability.step.channel import StepSignals
from hf_stability.step.skip_decision import innermost
from tests.testing_utils import (
    NoLabelBatches,
    PoisonActivations,
    PoisonGradient,
    StepSnapshots,
    assert_same_state,
    changed_parameters,
    emulate_fp16_scaler,
    mlm_dataset,
    run_two_ranks,
    tiny_bert,
    training_args,
)

POISONED = 2  # global_step when the poisoned step begins; it completes as step 3


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=64)


class ScalerWatch(StepSnapshots):
    """Also records the grad scaler's scale (if any) at the beginning and end of the watched steps."""

    def __init__(self, steps, scaler):
        super().__init__(steps)
        self.scaler = scaler
        self.scales: dict[int, list[float]] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step in self.steps and self.scaler is not None:
            self.scales[state.global_step] = [self.scaler.get_scale()]
        return super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self._current is not None and self.scaler is not None:
            self.scales[self._current].append(self.scaler.get_scale())
        return super().on_step_end(args, state, control, **kwargs)


@pytest.mark.parametrize(
    ("regime", "optim", "value"),
    [
        ("fp32", "adamw_torch_fused", float("inf")),
        ("fp32", "adamw_torch", float("nan")),
        ("bf16", "adamw_torch_fused", float("inf")),
        ("fp16", "adamw_torch_fused", float("inf")),
        ("fp16", "adamw_torch", float("nan")),
    ],
)
def test_poisoned_step_changes_nothing_and_training_goes_on(tmp_path, bert_tokenizer, dataset, regime, optim, value):
    args = training_args(tmp_path, optim=optim, bf16=regime == "bf16", fp16=regime == "fp16")
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    if regime == "fp16":
        emulate_fp16_scaler(trainer)
    watch = ScalerWatch([POISONED, POISONED + 1], trainer.accelerator.scaler)
    trainer.add_callback(PoisonGradient([POISONED], value=value))
    trainer.add_callback(watch)
    trainer.train()

    assert_same_state(watch.before[POISONED], watch.after[POISONED])
    assert changed_parameters(watch.before[POISONED + 1], watch.after[POISONED + 1]), "training did not go on"
    assert trainer.state.global_step == args.max_steps
    skip = find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback)
    assert (skip.skipped_steps, skip.consecutive_skips) == (1, 0)
    events = read_events(tmp_path)
    assert [(e["step"], e["event"]) for e in events] == [(POISONED + 1, "skip")]
    assert events[0]["ranks"] == [0]
    logged = {entry["step"]: entry["stability/skipped_steps"] for entry in trainer.state.log_history if "loss" in entry}
    assert logged == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1}
    if regime == "fp16":
        # Overflow: the scaler halves its scale on the skipped step, and counts it once with either optimizer.
        assert events[0]["reason"] == "fp16_overflow"
        assert events[0]["loss_scale"] == 2.0**10
        assert watch.scales == {POISONED: [2.0**10, 2.0**9], POISONED + 1: [2.0**9, 2.0**9]}
    else:
        assert events[0]["reason"] == "nonfinite_gradients"


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_fp16_overflow_between_logging_steps_is_left_to_the_scaler_and_reported_at_the_flush(
    tmp_path, bert_tokenizer, dataset, optim
):
    # Steps 3 and 4 are neither logging nor flush steps: step 3's flag stays on device until step 5 logs.
    args = training_args(tmp_path, optim=optim, fp16=True, logging_steps=5)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    emulate_fp16_scaler(trainer)
    flags = {}

    class Observer(StepSnapshots):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            step = state.global_step + 1
            flags[step] = (StepSignals.for_model(model).skip_flag(step), len(read_events(tmp_path)))

    watch = ScalerWatch([POISONED, POISONED + 1], trainer.accelerator.scaler)
    trainer.add_callback(PoisonGradient([POISONED]))
    trainer.add_callback(watch)
    trainer.add_callback(Observer([]))
    trainer.train()

    pending_flag, events_so_far = flags[POISONED + 1]
    assert isinstance(pending_flag, torch.Tensor) and bool(pending_flag) and events_so_far == 0
    assert flags[args.max_steps][0] is False  # the flush step is decided on the host
    assert_same_state(watch.before[POISONED], watch.after[POISONED])
    assert changed_parameters(watch.before[POISONED + 1], watch.after[POISONED + 1]), "training did not go on"
    assert watch.scales == {POISONED: [2.0**10, 2.0**9], POISONED + 1: [2.0**9, 2.0**9]}
    skip = find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback)
    assert (skip.skipped_steps, skip.consecutive_skips) == (1, 0)
    (event,) = read_events(tmp_path)
    assert (event["step"], event["event"], event["reason"]) == (POISONED + 1, "skip", "fp16_overflow")
    assert (event["ranks"], event["loss_scale"], event["consecutive"]) == ([0], 2.0**10, 1)
    assert str(event["grad_norm"]) in {"inf", "nan"}  # the +inf element; clipping turns it into NaN
    logged = {entry["step"]: entry["stability/skipped_steps"] for entry in trainer.state.log_history if "loss" in entry}
    assert logged == {5: 1}, "the logging step flushes before its log entry is built"


@pytest.mark.parametrize("regime", ["fp32", "bf16"])
def test_fused_adamw_skips_on_device_between_flushes_and_reports_at_the_flush(
    tmp_path, bert_tokenizer, dataset, regime
):
    # The default optimizer (adamw_torch_fused) honours a found_inf flag: steps 3 and 4 are no flush steps, so
    # step 3's skip happens on device and is counted when step 5 logs.
    args = training_args(tmp_path, bf16=regime == "bf16", logging_steps=5)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    flags, left_over = {}, []

    class Observer(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            step = state.global_step + 1
            flags[step] = (StepSignals.for_model(model).skip_flag(step), len(read_events(tmp_path)))

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            left_over.append(hasattr(innermost(optimizer), "found_inf"))

    watch = StepSnapshots([POISONED, POISONED + 1])
    trainer.add_callback(PoisonGradient([POISONED]))
    trainer.add_callback(watch)
    trainer.add_callback(Observer())
    trainer.train()

    pending_flag, events_so_far = flags[POISONED + 1]
    assert isinstance(pending_flag, torch.Tensor) and bool(pending_flag) and events_so_far == 0
    assert flags[args.max_steps][0] is False  # the flush step is decided on the host
    assert left_over == [False] * args.max_steps, "found_inf must not outlive its step"
    assert_same_state(watch.before[POISONED], watch.after[POISONED])
    assert changed_parameters(watch.before[POISONED + 1], watch.after[POISONED + 1]), "training did not go on"
    skip = find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback)
    assert (skip.skipped_steps, skip.consecutive_skips) == (1, 0)
    (event,) = read_events(tmp_path)
    assert (event["step"], event["event"], event["reason"]) == (POISONED + 1, "skip", "nonfinite_gradients")
    assert (event["ranks"], event["loss_scale"], event["consecutive"]) == ([0], None, 1)
    logged = {entry["step"]: entry["stability/skipped_steps"] for entry in trainer.state.log_history if "loss" in entry}
    assert logged == {5: 1}, "the logging step flushes before its log entry is built"


def test_fp16_overflow_queued_before_a_best_model_checkpoint_is_in_its_counters(tmp_path, bert_tokenizer, dataset):
    # save_strategy="best" saves right after the step-5 evaluation; steps 3-5 are no logging or save steps.
    args = training_args(tmp_path, fp16=True, logging_steps=100, eval_strategy="steps", eval_steps=5,
                         save_strategy="best", metric_for_best_model="loss")
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset, eval_dataset=dataset)
    emulate_fp16_scaler(trainer)
    trainer.add_callback(PoisonGradient([POISONED]))
    trainer.train()
    saved = json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["SkipNonFiniteCallback"]["attributes"]["skipped_steps"] == 1


class StabilityHookStep:
    """The step whose hf-stability callback hook is running (None outside them): where a host read is attributed.

    Wraps the stability callbacks' ``on_pre_optimizer_step``/``on_optimizer_step``/``on_step_end``; used as
    ``counting_host_reads(attribute_to=StabilityHookStep(trainer))``, so a read counts only while one of them runs,
    under the step being completed.
    """

    HOOKS = ("on_pre_optimizer_step", "on_optimizer_step", "on_step_end")

    def __init__(self, trainer: Trainer) -> None:
        self._step: int | None = None
        for callback in trainer.callback_handler.callbacks:
            if type(callback).__module__.startswith("hf_stability."):
                for hook in self.HOOKS:
                    setattr(callback, hook, self._inside(getattr(callback, hook)))

    def __call__(self) -> int | None:
        return self._step

    def _inside(self, hook):
        def wrapper(args, state, control, **kwargs):
            self._step = state.global_step + (hook.__name__ != "on_step_end")
            try:
                return hook(args, state, control, **kwargs)
            finally:
                self._step = None

        return wrapper


@pytest.mark.parametrize(
    ("regime", "optim", "expected"),
    [
        ("fp16", "adamw_torch_fused", 0),
        ("fp32", "adamw_torch_fused", 0),
        ("bf16", "adamw_torch_fused", 0),
        ("fp32", "adamw_torch", 1),  # no found_inf support: the skip is decided on the host
    ],
)
def test_host_reads_per_step_none_with_a_device_skip_one_on_the_host_path(
    tmp_path, bert_tokenizer, dataset, regime, optim, expected
):
    # Steps 1-5 are neither logging, save, check nor flush steps; step 6 (the last) flushes and checks.
    args = training_args(
        tmp_path,
        optim=optim,
        fp16=regime == "fp16",
        bf16=regime == "bf16",
        logging_steps=100,
        snapshot_interval=100,
        spike_check_interval=100,
    )
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    if regime == "fp16":
        emulate_fp16_scaler(trainer)
    hook_step = StabilityHookStep(trainer)
    trainer.add_callback(PoisonGradient([POISONED]))  # a skipped step must not cost a read either
    with counting_host_reads(attribute_to=hook_step) as reads:
        trainer.train()
    # On the host path the skipped step reports at once, and its event reads the step's sample indices and
    # per-sample losses (`hf_stability.samples`); queued on device, the report comes at the flush of step 6.
    reported = POISONED + 1 if expected else None
    assert [reads[step] for step in range(1, 6) if step != reported] == [expected] * (5 - bool(reported))
    if reported:
        assert reads[reported] > expected
    assert reads[6] >= 1, "the flush/check step reads; the counter must see it"
    assert find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback).skipped_steps == 1


@pytest.mark.parametrize("regime", ["fp16", "fp32"])
def test_queued_consecutive_skips_stop_within_the_documented_bound(tmp_path, bert_tokenizer, dataset, regime):
    # fp16: the grad scaler skips; fp32: the fused AdamW skips on its found_inf flag. Both queue the flags.
    limit = 3
    args = training_args(
        tmp_path,
        fp16=regime == "fp16",
        max_steps=20,
        logging_steps=100,
        max_consecutive_skips=limit,
        save_strategy="steps",
        save_steps=100,
    )
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    if regime == "fp16":
        emulate_fp16_scaler(trainer)
    trainer.add_callback(PoisonGradient(range(1, 20)))  # every step from step 2 overflows
    trainer.train()
    events = read_events(tmp_path)
    skips = [e for e in events if e["event"] == "skip"]
    (stop,) = [e for e in events if e["event"] == "stop"]
    reached = next(e["step"] for e in skips if e["consecutive"] == limit)
    assert reached == 1 + limit
    # Flushes come every `limit` queued steps, so the stop lands at most limit - 1 steps after the limit.
    assert reached <= stop["step"] <= reached + limit - 1
    assert trainer.state.global_step == stop["step"] < args.max_steps
    assert [e["step"] for e in skips] == list(range(2, stop["step"] + 1))
    assert (tmp_path / f"checkpoint-{stop['step']}" / "trainer_state.json").is_file()
    assert f"max_consecutive_skips={limit}" in stop["reason"]


def test_skip_record_and_gradients_tell_later_callbacks(tmp_path, bert_tokenizer, dataset):
    """The interface a later callback (spike rollback) relies on: no gradients and StepSignals.skipped(step)."""
    seen = {}

    class Observer(StepSnapshots):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            step = state.global_step + 1
            seen[step] = (
                StepSignals.for_model(model).skipped(step),
                all(p.grad is None for p in model.parameters()),
            )

    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), training_args(tmp_path, max_steps=4), train_dataset=dataset)
    trainer.add_callback(PoisonGradient([POISONED]))
    trainer.add_callback(Observer([]))
    trainer.train()
    assert seen == {1: (False, False), 2: (False, False), 3: (True, True), 4: (False, False)}


def test_nonfinite_loss_with_finite_gradients_is_reported_not_skipped(tmp_path, bert_tokenizer, dataset):
    # The batch without labels has loss 0/0 = NaN and all-zero gradients; the update goes ahead.
    # Spike rollback (on by default) would answer the NaN loss with a rollback; this test isolates the skip callback.
    args = training_args(tmp_path, max_steps=4, logging_nan_inf_filter=False, spike_rollback=False)
    trainer = StabilityTrainer(
        tiny_bert(bert_tokenizer), args, train_dataset=dataset, data_collator=NoLabelBatches([POISONED])
    )
    trainer.train()
    skip = find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback)
    assert (skip.skipped_steps, skip.nonfinite_loss_steps) == (0, 1)
    events = read_events(tmp_path)
    assert [(e["step"], e["event"], e["ranks"]) for e in events] == [(POISONED + 1, "nonfinite_loss", [0])]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # Trainer resets its running loss with `tr_loss -= tr_loss`, which keeps a NaN: every entry from the
    # poisoned one on reads NaN although the model is fine (hence the warning about the filter).
    assert [loss != loss for loss in losses] == [False, False, True, True]


def test_nonfinite_parameters_after_an_update_are_reported(tmp_path, bert_tokenizer, dataset):
    class CorruptWeights(StepSnapshots):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == POISONED:  # a NaN that appears while applying the update
                with torch.no_grad():
                    model.cls.predictions.transform.dense.weight[0, 0] = float("nan")

    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), training_args(tmp_path, max_steps=3), train_dataset=dataset)
    trainer.callback_handler.callbacks.insert(1, CorruptWeights([]))  # ahead of the skip callback's check
    trainer.train()
    skip = find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback)
    assert skip.nonfinite_parameter_steps == 1
    assert [(e["step"], e["event"]) for e in read_events(tmp_path)] == [(POISONED + 1, "nonfinite_parameters")]


def test_consecutive_skips_stop_cleanly_with_a_checkpoint(tmp_path, bert_tokenizer, dataset):
    args = training_args(tmp_path, max_steps=20, max_consecutive_skips=3, save_strategy="steps", save_steps=100)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    trainer.add_callback(PoisonGradient(range(1, 20)))
    trainer.train()
    assert trainer.state.global_step == 4  # step 1 healthy, steps 2-4 skipped, then stop
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").is_file()
    events = read_events(tmp_path)
    assert [(e["step"], e["event"]) for e in events] == [(2, "skip"), (3, "skip"), (4, "skip"), (4, "stop")]
    assert "max_consecutive_skips=3" in events[-1]["reason"]


def test_counters_survive_resume_from_checkpoint(tmp_path, bert_tokenizer, dataset):
    args = training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=4)
    first = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    first.add_callback(PoisonGradient([1]))
    first.train()

    resumed = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    resumed.add_callback(PoisonGradient([4]))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    callbacks = resumed.callback_handler.callbacks
    skip = find_callback(callbacks, SkipNonFiniteCallback)
    assert skip.skipped_steps == 2  # one before the checkpoint, one after the resume
    entries = {entry["step"]: entry for entry in resumed.state.log_history if "loss" in entry}
    assert entries[5]["stability/skipped_steps"] == 2
    # Trainer re-created the stateful callback at the end of the list; StabilityTrainer restored the order.
    names = [type(callback).__name__ for callback in callbacks]
    assert (
        names.index("SkipNonFiniteCallback")
        < names.index("SpikeRollbackCallback")
        < names.index("LossScaleTelemetryCallback")
        < names.index("PoisonGradient")
    )


def test_plain_trainer_with_callback_skips_and_warns_about_nan_filter(tmp_path, bert_tokenizer, dataset):
    args = training_args(tmp_path, max_steps=4)
    assert args.logging_nan_inf_filter
    skip = SkipNonFiniteCallback()
    snapshots = StepSnapshots([POISONED])
    trainer = Trainer(
        tiny_bert(bert_tokenizer),
        args,
        train_dataset=dataset,
        callbacks=[skip, PoisonActivations([POISONED]), snapshots],
    )
    with pytest.warns(UserWarning, match="hidden from the logged `loss` by `logging_nan_inf_filter=True`") as caught:
        trainer.train()
    assert sum("logging_nan_inf_filter" in str(w.message) for w in caught) == 1
    assert_same_state(snapshots.before[POISONED], snapshots.after[POISONED])
    assert skip.skipped_steps == 1

    # No NaN loss, nothing hidden: no warning, whatever the filter says (an Inf gradient leaves the loss finite).
    for name, overrides in [("clean", {}), ("unfiltered", {"logging_nan_inf_filter": False})]:
        quiet = Trainer(
            tiny_bert(bert_tokenizer),
            training_args(tmp_path / name, max_steps=4, **overrides),
            train_dataset=dataset,
            callbacks=[SkipNonFiniteCallback(), PoisonGradient([POISONED])],
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*logging_nan_inf_filter.*")
            quiet.train()


def test_max_consecutive_skips_is_validated():
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        SkipNonFiniteCallback(max_consecutive_skips=0)


@pytest.mark.distributed
def test_two_ranks_skip_together_when_one_rank_is_poisoned(tmp_path):
    run_two_ranks("tests.scripts.skip_two_ranks", tmp_path, timeout=240)
    final = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for name in final[0]["parameters"]:
        assert torch.equal(final[0]["parameters"][name], final[1]["parameters"][name]), name
    for rank in (0, 1):
        assert final[rank]["unchanged_across_poisoned_step"] and final[rank]["changed_after"]
        assert final[rank]["skipped_steps"] == 1
    events = read_events(tmp_path)
    assert len(events) == 1, events  # written once, by the main process
    # The NaN starts in rank 1's forward (its loss); DDP's all-reduce spreads it to both ranks' gradients.
    assert (events[0]["event"], events[0]["loss_ranks"], events[0]["ranks"]) == ("skip", [1], [0, 1])


def saved_checkpoints(output_dir) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in Path(output_dir).glob("checkpoint-*"))


def all_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("regime", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("blown_at", [4, 5], ids=["on-a-save-step", "between-saves"])
def test_nonfinite_weights_without_rollback_stop_at_once_and_write_no_checkpoint(
    tmp_path, bert_tokenizer, dataset, regime, blown_at
):
    from transformers import BertForMaskedLM

    from tests.rollback_faults import NanWeights

    # The update of step `blown_at` makes the weights NaN: every later loss and gradient is NaN whatever the
    # batch. That is no bad batch to skip, and with save_total_limit=1 a NaN checkpoint would rotate the
    # last finite one away.
    # Logging only at the end: in fp16 the flags stay queued on device until a save step reads them.
    args = training_args(tmp_path, max_steps=10, logging_steps=100, save_strategy="steps", save_steps=2,
                         save_total_limit=1, spike_rollback=False, bf16=regime == "bf16", fp16=regime == "fp16")
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    if regime == "fp16":
        emulate_fp16_scaler(trainer)
    trainer.add_callback(NanWeights([blown_at]))
    trainer.train()

    skip = find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback)
    # Found before the checkpoint of the step that blew them up, else in the flags of the next step.
    found_at = blown_at if blown_at % 2 == 0 else blown_at + 1
    assert (skip.skipped_steps, skip.nonfinite_parameter_steps) == (0, 1)
    events = read_events(tmp_path)
    assert [(e["step"], e["event"]) for e in events] == [(found_at, "nonfinite_parameters"), (found_at, "stop")]
    assert "non-finite" in events[1]["reason"] and "without saving" in events[1]["reason"]
    assert trainer.state.global_step == found_at
    last_finite = 2 * ((blown_at - 1) // 2)
    assert saved_checkpoints(tmp_path) == [last_finite], "the last finite checkpoint must stay the newest"
    assert all_finite(BertForMaskedLM.from_pretrained(tmp_path / f"checkpoint-{last_finite}"))


class OverflowEveryOtherStep(PoisonGradient):
    """An Inf gradient on every other step (the steps starting at an even ``global_step``): never two in a row.

    Each overflow halves GradScaler's scale and a recovery needs 2,000 clean steps, so the scale only falls.
    """

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.steps = {state.global_step} if state.global_step % 2 == 0 else set()
        return super().on_step_begin(args, state, control, model=model, **kwargs)


def test_fp16_scale_collapse_never_lets_a_nan_update_through(tmp_path, bert_tokenizer, dataset):
    # From 2**-118, nine overflows make the scale subnormal: then 1/scale overflows to Inf, and unscaling turns
    # the gradients NaN while the scaler's found-inf flag (it checks the scaled values) stays clear.
    steps = 30
    args = training_args(tmp_path, fp16=True, max_steps=steps, logging_steps=100, spike_rollback=False,
                         max_underflow_steps=1000)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    emulate_fp16_scaler(trainer, init_scale=2.0**-118)
    trainer.add_callback(OverflowEveryOtherStep([]))
    watch = ScalerWatch(range(steps), trainer.accelerator.scaler)
    trainer.add_callback(watch)
    trainer.train()

    inverse_overflows = [
        step for step, (scale, _) in watch.scales.items() if step % 2 and math.isinf(torch.tensor(1 / scale).item())
    ]
    assert len(inverse_overflows) >= 3, f"the scale never collapsed: {watch.scales}"
    for step in range(steps):
        parameters, _ = watch.after[step]
        assert all(torch.isfinite(p).all() for p in parameters.values()), f"a NaN update reached step {step + 1}"
        # An Inf batch, or NaN gradients the scaler did not flag (the first step creates the optimizer state anyway).
        if step > 0 and (step % 2 == 0 or step in inverse_overflows):
            assert_same_state(watch.before[step], watch.after[step])
    skipped = {e["step"] for e in read_events(tmp_path) if e["event"] == "skip"}
    assert {step + 1 for step in inverse_overflows} <= skipped
    assert trainer.state.global_step == steps


def test_fp16_loss_scale_under_the_floor_is_reported_and_stops_the_run_cleanly(tmp_path, bert_tokenizer, dataset,
                                                                                 caplog):
    # Scale 4 halves at steps 1, 3 and 5: step 6 is the first to run under the floor of 1, step 11 the sixth.
    args = training_args(tmp_path, fp16=True, max_steps=40, max_underflow_steps=6, save_strategy="steps",
                         save_steps=100, spike_rollback=False)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    emulate_fp16_scaler(trainer, init_scale=4.0)
    trainer.add_callback(OverflowEveryOtherStep([]))
    with caplog.at_level("WARNING", logger="hf_stability"):
        trainer.train()

    events = [e for e in read_events(tmp_path) if e["event"] in ("underflow", "stop")]
    underflow, stop = events
    assert (underflow["step"], underflow["loss_scale"]) == (6, 0.5)
    assert "under the floor" in underflow["reason"]
    assert (stop["step"], stop["consecutive_underflow"]) == (11, 6) and "max_underflow_steps=6" in stop["reason"]
    assert any("Step 6: loss scale 0.5 under the floor 1" in r.getMessage() for r in caplog.records)
    assert trainer.state.global_step == 11
    assert (tmp_path / "checkpoint-11" / "trainer_state.json").is_file()
    history = trainer.state.log_history
    logged = {entry["step"]: entry["stability/underflow_steps"] for entry in history if "loss" in entry}
    assert (logged[5], logged[6], logged[11]) == (0, 1, 6)
    skip = find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback)
    assert (skip.underflow_steps, skip.consecutive_underflow_steps) == (6, 6)
