"""`StepGuard`: the step's stability work runs in the guard's order, wherever the callbacks sit in the list."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from hf_stability import (
    AdaptiveClipCallback,
    LossScaleTelemetryCallback,
    SkipNonFiniteCallback,
    SpikeRollbackCallback,
    read_events,
)
from hf_stability.step.channel import StepSignals
from tests.rollback_faults import ThrowWeights
from tests.testing_utils import PoisonGradient, mlm_dataset, tiny_bert, training_args


def run(bert_tokenizer, output_dir, reverse: bool):
    """A plain-Trainer run with a NaN gradient at step 4 and a thrown update at step 12; its weights and events."""
    model = tiny_bert(bert_tokenizer)
    stability = [SkipNonFiniteCallback(), AdaptiveClipCallback(adaptive_clip_z=0.1, adaptive_clip_warmup=3),
                 SpikeRollbackCallback(spike_window=6, spike_warmup=4, snapshot_interval=5),
                 LossScaleTelemetryCallback(log_layer_grad_norms=True)]
    if reverse:  # against the old priority order, and never sorted (no `attach`)
        stability.reverse()
    args = training_args(output_dir, TrainingArguments, max_steps=18, logging_steps=1, max_grad_norm=0.0)
    faults = [PoisonGradient([3], float("nan")), ThrowWeights([12])]
    trainer = Trainer(model, args, train_dataset=mlm_dataset(bert_tokenizer, rows=160),
                      callbacks=[*faults, *stability])
    trainer.train()
    guard = StepSignals.for_model(model).guard
    assert guard.record is not None and guard.record.step == 18
    events = [{k: v for k, v in e.items() if k not in ("time", "wall_time")} for e in read_events(output_dir)]
    stability_logs = [{k: v for k, v in entry.items() if k.startswith("stability/")}
                      for entry in trainer.state.log_history if "loss" in entry]
    return {name: p.detach().clone() for name, p in model.named_parameters()}, events, stability_logs


def test_the_callbacks_position_in_the_list_changes_nothing(bert_tokenizer, tmp_path):
    ordered_weights, ordered_events, ordered_logs = run(bert_tokenizer, tmp_path / "ordered", reverse=False)
    reversed_weights, reversed_events, reversed_logs = run(bert_tokenizer, tmp_path / "reversed", reverse=True)
    kinds = [(e["event"], e["step"]) for e in ordered_events]
    assert ("skip", 4) in kinds and any(kind == "rollback" for kind, _ in kinds), kinds
    assert ordered_logs[-1]["stability/zclip_clipped_steps"] > 0  # telemetry measures the clipped gradients
    assert reversed_events == ordered_events
    assert reversed_logs == ordered_logs
    for name, value in ordered_weights.items():
        assert torch.equal(reversed_weights[name], value), name
