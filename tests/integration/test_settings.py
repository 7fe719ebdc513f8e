"""One home per setting: component settings own defaults, help and the one check; callbacks resolve them alike.

Each knob has one name (its flat `StabilityConfig` field) in messages, and each value is checked once per run.

Runs are real (tiny BERT, real `Trainer`); faults are real Inf gradients.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import sys

import pytest
from transformers import Trainer, TrainingArguments

from hf_stability import (
    AdaptiveClipCallback,
    LossScaleTelemetryCallback,
    SkipNonFiniteCallback,
    SpikeRollbackCallback,
    StabilityConfig,
    StabilityTrainer,
    read_events,
    settings,
)
from hf_stability.callbacks.resume import ResumableCallback
from hf_stability.config import COMPONENT_SETTINGS
from hf_stability.settings import (
    AdaptiveClipSettings,
    RollbackSettings,
    SkipSettings,
    SnapshotStorage,
    SpikeMetric,
    TelemetrySettings,
)
from tests.testing_utils import PoisonGradient, mlm_dataset, tiny_bert, training_args


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=64)


def test_every_component_setting_is_one_stability_config_field_with_its_default_and_help():
    config_fields = {f.name: f for f in dataclasses.fields(StabilityConfig)}
    declared = set()
    for settings_class in COMPONENT_SETTINGS:
        for setting in dataclasses.fields(settings_class):
            flat = config_fields[setting.name]
            declared.add(flat.name)
            assert flat.default == setting.default and flat.metadata["help"] == setting.metadata["help"]
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    switches = {"skip_nonfinite", "spike_rollback", "adaptive_clip"}
    assert set(config_fields) - inherited - switches == declared


def test_choices_are_string_enums_that_export_as_plain_strings(tmp_path):
    config = training_args(tmp_path, spike_metric="grad_norm", snapshot_storage="disk")
    assert config.spike_metric is SpikeMetric.GRAD_NORM and config.spike_metric == "grad_norm"
    assert f"{config.snapshot_storage}" == str(config.snapshot_storage) == "disk"
    assert config.to_dict()["spike_metric"] == "grad_norm"
    exported = SpikeRollbackCallback(metric="grad_norm", snapshot_storage=SnapshotStorage.DISK).state()["args"]
    assert json.loads(json.dumps(exported))["spike_metric"] == "grad_norm" and type(exported["snapshot_storage"]) is str


def test_a_plain_trainer_reads_every_setting_from_a_stability_config(tmp_path, bert_tokenizer, dataset):
    args = training_args(
        tmp_path, max_consecutive_skips=3, spike_window=20, spike_warmup=4, log_fp16_pressure=False,
        adaptive_clip_z=3.5,
    )
    callbacks = [SkipNonFiniteCallback(), SpikeRollbackCallback(), LossScaleTelemetryCallback(), AdaptiveClipCallback()]
    Trainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset, callbacks=callbacks)
    skip, rollback, telemetry, clip = callbacks
    assert skip.max_consecutive_skips == 3
    assert (rollback.settings.spike_window, rollback.settings.spike_warmup) == (20, 4)
    assert telemetry.log_fp16_pressure is False and clip.z == 3.5


def test_explicit_keywords_win_over_the_config_and_a_comparison_names_both_flat_knobs(tmp_path, bert_tokenizer):
    args = training_args(tmp_path, max_consecutive_skips=3, spike_warmup=20)
    skip = SkipNonFiniteCallback(max_consecutive_skips=2)
    Trainer(tiny_bert(bert_tokenizer), args, callbacks=[skip])
    assert skip.max_consecutive_skips == 2
    # 30 comes from the config, 40 from a constructor keyword in its older name: each named one way, the flat one.
    args = training_args(tmp_path, spike_window=30, spike_warmup=20)
    with pytest.raises(ValueError, match=r"^`spike_window` \(30\) must be >= `spike_warmup` \(40\): "):
        Trainer(tiny_bert(bert_tokenizer), args, callbacks=[SpikeRollbackCallback(warmup=40)])
    with pytest.raises(ValueError, match=r"^`spike_window` \(8\) must be >= `spike_warmup` \(16\): "):
        SpikeRollbackCallback(window=8, warmup=16)
    with pytest.raises(ValueError, match=r"^`spike_window` \(8\) must be >= `spike_warmup` \(64\): "):
        training_args(tmp_path, spike_window=8)


def test_plain_trainer_stops_after_the_configs_max_consecutive_skips(tmp_path, bert_tokenizer, dataset):
    """The bug: `max_consecutive_skips` of a StabilityConfig silently stayed 50 under a plain Trainer."""
    args = training_args(tmp_path, max_steps=20, max_consecutive_skips=3, save_strategy="steps", save_steps=100)
    trainer = Trainer(
        tiny_bert(bert_tokenizer),
        args,
        train_dataset=dataset,
        callbacks=[SkipNonFiniteCallback(), PoisonGradient(range(1, 20))],
    )
    trainer.train()
    assert trainer.state.global_step == 4  # step 1 healthy, steps 2-4 skipped, then stop
    events = read_events(tmp_path)
    assert [(e["step"], e["event"]) for e in events] == [(2, "skip"), (3, "skip"), (4, "skip"), (4, "stop")]
    assert "max_consecutive_skips=3" in events[-1]["reason"]


# The callback that takes each settings class's knobs as constructor keywords (the others are read from args only).
CALLBACK_OF = {
    SkipSettings: SkipNonFiniteCallback,
    RollbackSettings: SpikeRollbackCallback,
    TelemetrySettings: LossScaleTelemetryCallback,
    AdaptiveClipSettings: AdaptiveClipCallback,
}
KNOBS = [(owner, knob.name) for owner in COMPONENT_SETTINGS for knob in dataclasses.fields(owner)]


def test_every_default_passes_its_check():
    """Defaults are not checked at run time (only values that are set are): they must be valid as written."""
    for settings_class, name in KNOBS:
        default = settings_class.field_of(name).default
        assert settings.check_knob(settings_class, name, default) == default, name


@pytest.mark.parametrize(("settings_class", "name"), KNOBS, ids=[name for _, name in KNOBS])
def test_every_error_message_names_the_knob_by_its_flat_name(tmp_path, settings_class, name):
    """However a bad value enters (config field, constructor keyword or its older alias, checkpoint), one name."""
    named = rf"^`{name}`[ :]"
    with pytest.raises(ValueError, match=named):
        StabilityConfig(str(tmp_path), **{name: object()})
    callback = CALLBACK_OF.get(settings_class)
    if callback is None:
        return
    keywords = [name] + [old for old, flat in callback.aliases.items() if flat == name]
    for keyword in keywords:
        with pytest.raises(ValueError, match=named):
            callback(**{keyword: object()})
        if issubclass(callback, ResumableCallback):
            assert re.search(rf"^args: `{name}`[ :]", callback.stored_problem({"args": {keyword: object()}}))


def test_each_knob_is_checked_once_per_run(tmp_path, bert_tokenizer, dataset, monkeypatch):
    """A real run counts the calls of the one check: once per knob for a StabilityTrainer run (at config creation,
    not again when the trainer is built or training begins), once per constructor keyword under a plain Trainer."""
    checks: collections.Counter[str] = collections.Counter()
    real = settings.check_knob

    def counting(settings_class, name, value):
        checks[name] += 1
        return real(settings_class, name, value)

    for module in list(sys.modules.values()):  # every module that imported the check by name
        if getattr(module, "check_knob", None) is real:
            monkeypatch.setattr(module, "check_knob", counting)
    args = training_args(tmp_path / "stability", max_steps=3, spike_sigma=5.0, adaptive_clip=True,
                         stability_alerts="stop", save_strategy="steps", save_steps=3)
    assert checks == collections.Counter(name for _, name in KNOBS)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    trainer.train()
    assert trainer.state.global_step == 3
    assert checks == collections.Counter(name for _, name in KNOBS)  # nothing checked again

    checks.clear()
    rollback = SpikeRollbackCallback(sigma=5.0, spike_window=16, warmup=8)
    assert checks == {"spike_sigma": 1, "spike_window": 1, "spike_warmup": 1}
    plain = Trainer(tiny_bert(bert_tokenizer), training_args(tmp_path / "plain", TrainingArguments, max_steps=3),
                    train_dataset=dataset, callbacks=[rollback])
    plain.train()
    assert rollback.settings.spike_sigma == 5.0 and plain.state.global_step == 3
    assert checks == {"spike_sigma": 1, "spike_window": 1, "spike_warmup": 1}


def test_a_knob_and_its_older_name_together_are_refused():
    with pytest.raises(TypeError, match="`spike_window` given twice"):
        SpikeRollbackCallback(spike_window=16, window=16)
