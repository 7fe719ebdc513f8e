"""The stability doctor: each rule fires on its symptom, produced for real, and names its evidence and remedy.

Every run is a real tiny BERT under the real `StabilityTrainer`; faults are injected into the real backward pass
or update (`PoisonGradient`, `ThrowWeights`, `NanWeights`, a gradient-growing hook), and fp16 is emulated on CPU
with a real `torch.amp.GradScaler("cpu")`. The clean recipes' "no findings" is checked in tests/integration/recipes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import TrainerCallback

from hf_stability import StabilityTrainer
from hf_stability.alerts import StabilityAlert
from hf_stability.cli import main as cli_main
from hf_stability.doctor import BAD_SAMPLES_FILENAME, Finding, diagnose, read_bad_samples
from hf_stability.events import read_events
from tests.rollback_faults import NanWeights, ThrowWeights
from tests.testing_utils import PoisonGradient, emulate_fp16_scaler, mlm_dataset, tiny_bert, training_args


class GrowGradients(TrainerCallback):
    """Multiplies every gradient by ``factor ** k`` in the k-th of the steps ``first .. last - 1`` (a gradient hook),
    as a diverging run's gradient norm grows step after step."""

    def __init__(self, first: int, last: int, factor: float) -> None:
        self.first, self.last, self.factor = first, last, factor
        self._handles: list = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.first <= state.global_step < self.last:
            scale = self.factor ** (state.global_step - self.first + 1)
            self._handles = [p.register_hook(lambda grad, scale=scale: grad * scale) for p in model.parameters()]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles = []


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=128)


def _train(output_dir: Path, tokenizer, dataset, callbacks: list, fp16_scale: float | None = None,
           alerts: list[StabilityAlert] | None = None, **overrides):
    args = training_args(output_dir, fp16=fp16_scale is not None, **overrides)
    trainer = StabilityTrainer(tiny_bert(tokenizer), args, train_dataset=dataset, callbacks=callbacks)
    if alerts is not None:
        trainer.on_stability_event(alerts.append)
    if fp16_scale is not None:
        emulate_fp16_scaler(trainer, init_scale=fp16_scale)
    trainer.train()
    trainer.save_state()
    return trainer


def _doctor(output_dir: Path, capsys) -> str:
    capsys.readouterr()  # the training log
    assert cli_main(["doctor", str(output_dir)]) == 0
    text = capsys.readouterr().out
    print(text)  # the README and docs/doctor.md quote these outputs
    return text


def _only(findings: list[Finding], rule: str) -> Finding:
    assert [finding.rule for finding in findings] == [rule], [finding.headline() for finding in findings]
    return findings[0]


def test_a_clean_fp16_run_has_no_findings(tmp_path, bert_tokenizer, dataset, capsys):
    _train(tmp_path, bert_tokenizer, dataset, [], fp16_scale=2.0**10, max_steps=12, log_layer_grad_norms=True)
    assert diagnose(tmp_path) == []
    text = _doctor(tmp_path, capsys)
    assert "No findings: the record shows no symptom of instability." in text


def test_overflows_only_in_the_scalers_initial_search_are_not_a_finding(tmp_path, bert_tokenizer, dataset):
    # Steps 1-3 overflow one after another from the start: GradScaler searching down from its initial scale.
    _train(tmp_path, bert_tokenizer, dataset, [PoisonGradient([0, 1, 2])], fp16_scale=2.0**10, max_steps=8)
    assert [e["reason"] for e in read_events(tmp_path)] == ["fp16_overflow"] * 3
    assert diagnose(tmp_path) == []


def test_recurring_fp16_overflows_mean_the_fp16_range_is_exceeded(tmp_path, bert_tokenizer, dataset, capsys):
    _train(tmp_path, bert_tokenizer, dataset, [PoisonGradient([3, 5, 7, 9])], fp16_scale=2.0**10, max_steps=12)
    finding = _only(diagnose(tmp_path), "fp16_range")
    assert finding.cause.startswith("Likely the fp16 range is exceeded")
    assert finding.steps == [4, 6, 8, 10]
    assert "4 fp16 overflow skip(s) after the loss scaler's initial search, at steps 4, 6, 8, 10" in finding.evidence[0]
    assert "loss scale ranged 64 .. 1024" in finding.evidence[1]  # 2^10 halved four times
    assert "use bf16" in finding.remedy[0] and "lower the learning rate" in finding.remedy[1]
    assert "initialisation scale" in finding.remedy[2]
    assert "1. [fp16_range] Likely the fp16 range is exceeded" in _doctor(tmp_path, capsys)


def test_a_tiny_loss_scale_loses_gradients_to_fp16_underflow(tmp_path, bert_tokenizer, dataset):
    _train(tmp_path, bert_tokenizer, dataset, [], fp16_scale=2.0**-16, max_steps=6)
    finding = _only(diagnose(tmp_path), "fp16_underflow")
    assert finding.cause.startswith("Likely fp16 underflow")
    assert "median underflow fraction" in finding.evidence[0] and "loss scale 1.52588e-05" in finding.evidence[1]
    assert "raise the initial loss scale" in finding.remedy[0] and "bf16" in finding.remedy[1]


def test_a_stop_after_consecutive_skips_names_the_first_bad_step(tmp_path, bert_tokenizer, dataset, capsys):
    _train(tmp_path, bert_tokenizer, dataset, [PoisonGradient(range(4, 20))], max_steps=12, max_consecutive_skips=3)
    (stop,) = [e for e in read_events(tmp_path) if e["event"] == "stop"]
    assert stop["step"] == 7
    finding = _only(diagnose(tmp_path), "stop_after_skips")
    assert finding.cause == ("Likely the data or the model is broken from step 5 on: every step since then had "
                             "non-finite gradients.")
    assert finding.steps == [5, 6, 7]
    assert "3 consecutive skipped steps (5..7; skip reasons in this run: nonfinite_gradients)" in finding.evidence[0]
    assert "holds the weights of step 4" in finding.evidence[1]
    assert "the step's samples are not recorded in this run" in finding.remedy[0]
    assert "1. [stop_after_skips]" in _doctor(tmp_path, capsys)


def test_non_finite_weights_mean_the_update_overflowed(tmp_path, bert_tokenizer, dataset, capsys):
    _train(tmp_path, bert_tokenizer, dataset, [NanWeights([4])], max_steps=10, spike_rollback=False)
    findings = diagnose(tmp_path)
    assert findings[0].rule == "nonfinite_weights"
    assert findings[0].cause.startswith("Likely the optimizer update itself overflowed")
    assert findings[0].steps and findings[0].steps[0] >= 4
    assert "lower the learning rate" in findings[0].remedy[0] and "epsilon" in findings[0].remedy[1]
    assert "fp32 master weights" in findings[0].remedy[2]
    assert "1. [nonfinite_weights]" in _doctor(tmp_path, capsys)


def test_spikes_recurring_after_rollbacks_with_the_lr_cut_point_to_the_optimisation(
    tmp_path, bert_tokenizer, dataset, capsys
):
    alerts: list[StabilityAlert] = []
    _train(tmp_path, bert_tokenizer, dataset, [ThrowWeights([25, 40])], max_steps=50, max_grad_norm=0.0,
           warmup_steps=5, spike_window=16, spike_warmup=10, snapshot_interval=5, rollback_lr_factor=0.5,
           alerts=alerts, stability_alerts="rollback", stability_alert_interval=0)
    rollbacks = [e for e in read_events(tmp_path) if e["event"] == "rollback"]
    assert [e["spike_step"] for e in rollbacks] == [26, 41]
    # Each rollback alerts the registered callable, with the event and, at the second, the doctor's finding so far.
    assert [(alert.kind, alert.event["spike_step"]) for alert in alerts] == [("rollback", 26), ("rollback", 41)]
    assert alerts[1].top_finding is not None and alerts[1].top_finding.startswith("[recurring_spikes]")
    finding = _only(diagnose(tmp_path), "recurring_spikes")
    assert finding.cause.startswith("Likely an optimisation instability")
    assert finding.steps == [26, 41]
    assert "2 spike(s) after warm-up (peak learning rate reached at step 6) at steps 26, 41" in finding.evidence[0]
    assert "cut the learning rate to 0.5x" in finding.evidence[1]
    assert finding.remedy[0] == "lower the peak learning rate" and "beta2 = 0.95" in finding.remedy[1]
    assert finding.remedy[3] == "a longer warm-up" and "QK-norm or z-loss" in finding.remedy[-1]
    assert "1. [recurring_spikes]" in _doctor(tmp_path, capsys)


def test_gradient_norm_growing_before_a_skip_means_exploding_gradients(tmp_path, bert_tokenizer, dataset, capsys):
    # Steps 3..9 multiply the gradients by 2, 4, ..., 128; step 10's gradients are then non-finite.
    _train(tmp_path, bert_tokenizer, dataset, [GrowGradients(2, 9, 2.0), PoisonGradient([9])], max_steps=12)
    finding = _only(diagnose(tmp_path), "growing_gradients")
    assert finding.cause.startswith("Likely exploding gradients") and finding.steps == [10]
    assert "before the trouble at step 10" in finding.evidence[0] and "(step 9)" in finding.evidence[0]
    assert "max_grad_norm" in finding.remedy[0] and "ZClip" in finding.remedy[1]
    assert "1. [growing_gradients]" in _doctor(tmp_path, capsys)


def test_samples_named_at_several_steps_are_bad_data(tmp_path, bert_tokenizer, dataset, capsys):
    """No producer of stability_bad_samples.json exists yet (issue 19, section 1): a hand-made file in its
    documented format (sample index -> events) sits beside a real run whose poisoned steps it names."""
    _train(tmp_path, bert_tokenizer, dataset, [PoisonGradient([2, 6])], max_steps=8)
    skips = [e["step"] for e in read_events(tmp_path)]
    assert skips == [3, 7]
    bad = {"17": [{"step": 3, "event": "skip"}, {"step": 7, "event": "skip"}], "40": [{"step": 3, "event": "skip"}]}
    (tmp_path / BAD_SAMPLES_FILENAME).write_text(json.dumps(bad))
    finding = _only(diagnose(tmp_path), "recurring_samples")
    assert finding.samples == [17] and finding.steps == [3, 7]  # sample 40 came once: not recurring
    assert finding.evidence == ["sample 17: events at steps 3, 7 (skip)"]
    assert "--exclude_samples auto" in finding.remedy[0]
    assert "1. [recurring_samples]" in _doctor(tmp_path, capsys)


def test_a_bad_samples_file_of_another_shape_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / BAD_SAMPLES_FILENAME).write_text(json.dumps({"x": [1]}))
    with pytest.raises(ValueError, match="expected"):
        read_bad_samples(tmp_path)
    (tmp_path / "stability_events.jsonl").write_text("")
    assert cli_main(["doctor", str(tmp_path)]) == 2
    assert "hf-stability doctor: error:" in capsys.readouterr().err


def test_doctor_json_output_and_report_diagnosis(tmp_path, bert_tokenizer, dataset, capsys):
    _train(tmp_path, bert_tokenizer, dataset, [PoisonGradient(range(2, 20))], max_steps=8, max_consecutive_skips=2)
    capsys.readouterr()  # the training log
    assert cli_main(["doctor", str(tmp_path), "--json"]) == 0
    (finding,) = json.loads(capsys.readouterr().out)
    assert finding["rule"] == "stop_after_skips" and finding["steps"] == [3, 4]
    assert cli_main(["report", str(tmp_path), "--no-plot"]) == 0
    report = capsys.readouterr().out
    assert "  Diagnosis (hf-stability doctor):\n    1. [stop_after_skips] Likely the data or the model" in report
