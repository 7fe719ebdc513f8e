"""One home per setting: component settings own defaults, help and validation; callbacks resolve them alike.

Runs are real (tiny BERT, real `Trainer`); faults are real Inf gradients.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import Trainer, TrainingArguments

from hf_stability import (
    AdaptiveClipCallback,
    LossScaleTelemetryCallback,
    SkipNonFiniteCallback,
    SpikeRollbackCallback,
    StabilityConfig,
    read_events,
)
from hf_stability.config import COMPONENT_SETTINGS
from hf_stability.settings import RollbackSettings, SnapshotStorage, SpikeMetric
from tests.testing_utils import PoisonGradient, mlm_dataset, tiny_bert, training_args


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=64)


def test_every_component_setting_is_one_stability_config_field_with_its_default_and_help():
    config_fields = {f.name: f for f in dataclasses.fields(StabilityConfig)}
    declared = set()
    for settings_class in COMPONENT_SETTINGS:
        for setting in dataclasses.fields(settings_class):
            flat = config_fields[setting.metadata["config"]]
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
    assert json.loads(json.dumps(exported))["metric"] == "grad_norm" and type(exported["snapshot_storage"]) is str


def test_a_plain_trainer_reads_every_setting_from_a_stability_config(tmp_path, bert_tokenizer, dataset):
    args = training_args(
        tmp_path, max_consecutive_skips=3, spike_window=20, spike_warmup=4, log_fp16_pressure=False,
        adaptive_clip_z=3.5,
    )
    callbacks = [SkipNonFiniteCallback(), SpikeRollbackCallback(), LossScaleTelemetryCallback(), AdaptiveClipCallback()]
    Trainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset, callbacks=callbacks)
    skip, rollback, telemetry, clip = callbacks
    assert skip.max_consecutive_skips == 3
    assert (rollback.settings.window, rollback.settings.warmup) == (20, 4)
    assert telemetry.log_fp16_pressure is False and clip.z == 3.5


def test_explicit_keywords_win_over_the_config_and_errors_name_where_each_value_came_from(tmp_path, bert_tokenizer):
    args = training_args(tmp_path, max_consecutive_skips=3, spike_warmup=20)
    skip = SkipNonFiniteCallback(max_consecutive_skips=2)
    Trainer(tiny_bert(bert_tokenizer), args, callbacks=[skip])
    assert skip.max_consecutive_skips == 2
    with pytest.raises(ValueError, match=r"`window` \(10\) must be >= `spike_warmup` \(20\)"):
        RollbackSettings.resolve({"window": 10}, args)


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
