"""Alerts: on the events named in ``stability_alerts`` a callable registered with
`StabilityTrainer.on_stability_event` is called (rate-limited, main process) and, with W&B active, ``wandb.alert``.

Real runs with real faults; W&B runs offline (tests/conftest.py sets WANDB_MODE=offline) and is read back from disk.
"""

from __future__ import annotations

import json

import pytest

from hf_stability import StabilityConfig, StabilityTrainer
from hf_stability.alerts import StabilityAlert
from tests.testing_utils import (
    PoisonGradient,
    mlm_dataset,
    offline_wandb_records,
    run_two_ranks,
    tiny_bert,
    training_args,
)


def test_alerts_reach_the_callable_and_wandb_offline_rate_limited(tmp_path, bert_tokenizer, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    output_dir = tmp_path / "run"
    # Steps 3..8 have non-finite gradients: skip bursts (2 skips within 10 steps) at 4, 6 and 8, then a stop at 8.
    args = training_args(output_dir, max_steps=12, report_to=["wandb"], max_consecutive_skips=6,
                         stability_alerts="stop,skip_burst", stability_alert_skip_burst=2,
                         stability_alert_skip_window=10, stability_alert_interval=3600)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=mlm_dataset(bert_tokenizer, rows=64),
                               callbacks=[PoisonGradient(range(2, 20))])
    received: list[StabilityAlert] = []

    def broken_hook(alert: StabilityAlert) -> None:
        raise RuntimeError("the pager is down")

    trainer.on_stability_event(broken_hook)  # a failing hook neither stops training nor the next hook
    trainer.on_stability_event(received.append)
    trainer.train()

    assert trainer.state.global_step == 8  # stopped by max_consecutive_skips, not by an alert
    assert [(alert.kind, alert.step, alert.held_back) for alert in received] == [("skip_burst", 4, 0), ("stop", 8, 0)]
    burst, stop = received
    assert burst.title.startswith("hf-stability: 2 skipped steps within 10 steps at step 4")
    assert "Step 4: 2 skipped steps within 10 steps. Cause recorded: nonfinite_gradients" in burst.text
    assert stop.event["event"] == "stop" and "max_consecutive_skips=6" in stop.text
    # The doctor's top finding at the moment of the stop, read from the events file and the live log history.
    assert stop.top_finding is not None and stop.top_finding.startswith("[stop_after_skips] Likely the data or")
    assert "Doctor's top finding: [stop_after_skips]" in stop.text
    # W&B (offline) recorded the same alerts, and the doctor's diagnosis in its run summary at the end of training.
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    import wandb

    wandb.finish()
    alerts = offline_wandb_records(run_dir, "alert")
    assert [(alert["level"], alert["text"]) for alert in alerts] == [("WARN", burst.text), ("ERROR", stop.text)]
    summary: dict = {}
    for record in offline_wandb_records(run_dir, "summary"):
        summary.update(record["update"])
    assert summary["stability/findings"] == 1
    assert summary["stability/diagnosis"].startswith("1. [stop_after_skips] Likely the data or the model is broken")


def test_the_rate_limit_counts_held_back_alerts_in_the_next(tmp_path, bert_tokenizer):
    # Interval 0: every burst alerts. Skips at 3..8 with bursts of 2: alerts at 4, 6, 8.
    args = training_args(tmp_path, max_steps=8, stability_alerts="skip_burst", stability_alert_skip_burst=2,
                         stability_alert_interval=0)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=mlm_dataset(bert_tokenizer, rows=64),
                               callbacks=[PoisonGradient(range(2, 20))])
    received: list[StabilityAlert] = []
    trainer.on_stability_event(received.append)
    trainer.train()
    assert [alert.step for alert in received] == [4, 6, 8]
    # The listener is gone after training: an event appended now alerts no one.
    from hf_stability.events import StabilityEventLog

    StabilityEventLog(tmp_path).append(9, "skip", "by hand")
    StabilityEventLog(tmp_path).append(10, "skip", "by hand")
    assert len(received) == 3


def test_alert_settings_are_checked_in_one_line(tmp_path, bert_tokenizer):
    with pytest.raises(ValueError, match=r"`stability_alerts`: unknown event\(s\) \['spike'\]"):
        StabilityConfig(str(tmp_path), stability_alerts="stop,spike")
    with pytest.raises(ValueError, match="`stability_alert_skip_burst` must be >= 1"):
        StabilityConfig(str(tmp_path), stability_alert_skip_burst=0)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), training_args(tmp_path),
                               train_dataset=mlm_dataset(bert_tokenizer, rows=16))
    with pytest.raises(ValueError, match="`stability_alerts` is empty"):
        trainer.on_stability_event(print)


@pytest.mark.distributed
def test_only_the_main_process_alerts_on_two_ranks(tmp_path):
    run_two_ranks("tests.scripts.alerts_two_ranks", tmp_path, timeout=600)
    assert not (tmp_path / "alerts-rank1.jsonl").exists()  # rank 1 had the fault, rank 0 alone reports it
    alerts = [json.loads(line) for line in (tmp_path / "alerts-rank0.jsonl").read_text().splitlines()]
    # DDP's all-reduce carries rank 1's inf into rank 0's gradients: the skip names both ranks.
    assert alerts == [{"kind": "skip", "step": 3, "ranks": [0, 1]}]
