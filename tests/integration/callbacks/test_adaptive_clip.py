"""`AdaptiveClipCallback` (ZClip-style z-score clipping) on real tiny BERT runs.

The gradients are scaled by a hook (``ScaleGradients``) so that ordinary steps have a norm well below a
fixed clip of 1.0, as in a run past its first steps; a burst multiplies one step's gradients by 4: still
under 1.0, so ``max_grad_norm=1.0`` applies it in full, while it sits many deviations above the recent norms.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from benchmarks.host_reads import counting_host_reads
from hf_stability import AdaptiveClipCallback, StabilityConfig, StabilityTrainer
from hf_stability.callbacks.order import find_callback
from hf_stability.step.channel import completing_step, global_grad_norm, gradients
from tests.testing_utils import (
    PoisonGradient,
    emulate_fp16_scaler,
    mlm_dataset,
    tiny_bert,
    training_args,
)

BASE_SCALE = 0.1  # ordinary steps: gradient norm ~0.2
BURST_STEP, BURST_FACTOR = 12, 4.0  # the burst: ~0.8, below the fixed clip of 1.0
WARMUP = 5


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=128)


class ScaleGradients(TrainerCallback):
    """Multiplies every gradient by ``BASE_SCALE`` (and by ``BURST_FACTOR`` more on the optimizer step ``burst``)."""

    def __init__(self, burst: int | None = None) -> None:
        self.burst = burst
        self._handles: list = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        factor = BASE_SCALE * (BURST_FACTOR if completing_step(state) == self.burst else 1.0)
        self._handles = [p.register_hook(lambda grad, f=factor: grad * f) for p in model.parameters()]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles = []


class AppliedNorm(TrainerCallback):
    """The norm of the gradients the optimizer receives, per step (runs after the stability callbacks)."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = gradients(model.parameters())
        if grads:
            self.norms[completing_step(state)] = global_grad_norm(grads).item()


def run(tmp_path, tokenizer, dataset, burst=None, regime="fp32", **overrides):
    args = training_args(tmp_path, max_steps=14, max_grad_norm=1.0, adaptive_clip_warmup=WARMUP,
                         fp16=regime == "fp16", spike_rollback=False, **overrides)
    trainer = StabilityTrainer(tiny_bert(tokenizer), args, train_dataset=dataset)
    if regime == "fp16":
        emulate_fp16_scaler(trainer)
    applied = AppliedNorm()
    trainer.add_callback(ScaleGradients(burst))
    trainer.add_callback(applied)
    return trainer, applied


@pytest.mark.parametrize("regime", ["fp32", "fp16"])
def test_a_burst_below_the_fixed_clip_is_clipped_to_the_bound(tmp_path, bert_tokenizer, dataset, regime):
    fixed, fixed_norms = run(tmp_path / "fixed", bert_tokenizer, dataset, burst=BURST_STEP, regime=regime)
    fixed.train()
    ordinary = [fixed_norms.norms[step] for step in range(1, BURST_STEP)]
    assert max(ordinary) < 0.3 and 0.6 < fixed_norms.norms[BURST_STEP] < 1.0, "the burst passes the fixed clip"

    trainer, applied = run(tmp_path / "adaptive", bert_tokenizer, dataset, burst=BURST_STEP, regime=regime,
                           adaptive_clip=True)
    trainer.train()
    clip = find_callback(trainer.callback_handler.callbacks, AdaptiveClipCallback)
    assert clip.clipped_steps == 1
    entries = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    bound = entries[BURST_STEP - 1]["stability/zclip_bound"]  # the bound the burst step was judged against
    assert max(ordinary) < bound < 0.3
    assert applied.norms[BURST_STEP] == pytest.approx(bound, rel=1e-4)
    assert [entries[step]["stability/zclip_clipped_steps"] for step in (BURST_STEP - 1, BURST_STEP)] == [0, 1]
    # Before the burst nothing was touched: the same gradients were applied as in the fixed-clip run.
    assert [applied.norms[step] for step in range(1, BURST_STEP)] == ordinary


def test_clean_steps_below_the_bound_are_bit_identical(tmp_path, bert_tokenizer, dataset):
    results = []
    for name, enabled in [("off", False), ("on", True)]:
        trainer, _ = run(tmp_path / name, bert_tokenizer, dataset, adaptive_clip=enabled)
        trainer.train()
        results.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    clip = find_callback(trainer.callback_handler.callbacks, AdaptiveClipCallback)
    assert clip.clipped_steps == 0 and clip.healthy_steps == 14
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


@pytest.mark.parametrize("regime", ["fp32", "fp16"])  # fp16: the skip is still pending on device
def test_a_skipped_step_leaves_the_statistics_alone_and_no_host_read_per_step(
    tmp_path, bert_tokenizer, dataset, regime
):
    trainer, _ = run(tmp_path, bert_tokenizer, dataset, regime=regime, adaptive_clip=True, logging_steps=100)
    clip = find_callback(trainer.callback_handler.callbacks, AdaptiveClipCallback)
    stats: dict[int, torch.Tensor] = {}
    reads: dict[int, int] = {}
    hook = clip.on_pre_optimizer_step

    def counted(args, state, control, **kwargs):
        with counting_host_reads() as counts:
            hook(args, state, control, **kwargs)
        reads[completing_step(state)] = sum(counts.values())
        stats[completing_step(state)] = clip.stage.stats.clone()

    clip.on_pre_optimizer_step = counted
    trainer.add_callback(PoisonGradient([BURST_STEP - 1]))  # step 12 has an Inf gradient: skipped
    trainer.train()
    assert torch.equal(stats[BURST_STEP], stats[BURST_STEP - 1]), "the skipped step fed the statistics"
    assert clip.healthy_steps == 13 and clip.clipped_steps == 0
    assert set(reads.values()) == {0}, reads


def test_plain_trainer_logs_the_bound(tmp_path, bert_tokenizer, dataset):
    # No fixed clip: a plain Trainer shares no pre-clip norm, and norms capped at max_grad_norm would all read ~1.0.
    args = training_args(tmp_path, args_class=TrainingArguments, max_steps=4, max_grad_norm=0.0)
    clip = AdaptiveClipCallback(warmup=2)
    trainer = Trainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset, callbacks=[clip])
    trainer.train()
    entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["stability/zclip_clipped_steps"] for entry in entries] == [clip.clipped_steps] * 4 == [0] * 4
    assert all(entry["stability/zclip_bound"] > 0 for entry in entries)


def test_settings_are_validated(tmp_path):
    for name, value in [("adaptive_clip_z", 0.0), ("adaptive_clip_alpha", 1.0), ("adaptive_clip_warmup", 1)]:
        with pytest.raises(ValueError, match=name):
            StabilityConfig(str(tmp_path), **{name: value})
    with pytest.raises(ValueError, match="alpha"):
        AdaptiveClipCallback(alpha=0.0)


def test_statistics_survive_resume_from_checkpoint(tmp_path, bert_tokenizer, dataset):
    first, _ = run(tmp_path, bert_tokenizer, dataset, adaptive_clip=True, save_strategy="steps", save_steps=8)
    first.train()
    saved = json.loads((tmp_path / "checkpoint-8" / "trainer_state.json").read_text())
    exported = saved["stateful_callbacks"]["AdaptiveClipCallback"]
    assert exported["args"] == {"adaptive_clip_z": 2.5, "adaptive_clip_alpha": 0.97, "adaptive_clip_warmup": WARMUP}
    assert exported["attributes"]["healthy_steps"] == 8 and exported["attributes"]["mean"] > 0

    resumed, _ = run(tmp_path, bert_tokenizer, dataset, adaptive_clip=True, save_strategy="steps", save_steps=8)
    statistics = {}

    class AtResume(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clip = find_callback(resumed.callback_handler.callbacks, AdaptiveClipCallback)
            statistics.update(mean=clip.mean, var=clip.var, healthy_steps=clip.healthy_steps)

    resumed.add_callback(AtResume())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert statistics == {key: exported["attributes"][key] for key in ("mean", "var", "healthy_steps")}
    assert find_callback(resumed.callback_handler.callbacks, AdaptiveClipCallback).healthy_steps == 14
