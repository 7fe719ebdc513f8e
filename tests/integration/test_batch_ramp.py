"""Batch-size ramp: samples per optimizer step follow the Megatron-style ramp, on 1 and 2 ranks and across a resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from hf_stability import StabilityConfig, StabilityTrainer
from hf_stability.batch_ramp import BatchRamp
from tests.scripts.ramp_probe import StepRows
from tests.testing_utils import mlm_dataset, run_two_ranks, tiny_bert, training_args

# 4 samples per micro-batch, 4 micro-batches at the target: global batch 16, reached over 24 samples from 4.
RAMP = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "batch_ramp_start": 4,
        "batch_ramp_increment": 4, "batch_ramp_length": 24}
SIZES = [4, 4, 8, 12, 16, 16, 16, 16, 16, 16]  # Megatron: +4 every 24 / 3 = 8 consumed samples
ROWS = 128  # 8 steps of 16 per Trainer epoch: 10 steps cross an epoch boundary


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=ROWS)


def stream(dataset, start: int, count: int) -> list[tuple[int, ...]]:
    """The sequential sample stream: passes over the dataset in order."""
    return [tuple(dataset[(start + i) % len(dataset)]["input_ids"]) for i in range(count)]


def test_the_schedule_is_megatrons():
    assert [BatchRamp(4, 4, 24, 16).at(step)[1] for step in range(10)] == SIZES
    assert [BatchRamp(4, 4, 6, 16, unit="steps").at(step)[1] for step in range(8)] == [4, 4, 8, 8, 12, 12, 16, 16]


def ramp_trainer(output_dir, tokenizer, dataset, **overrides) -> tuple[StabilityTrainer, StepRows]:
    args = training_args(output_dir, **{"max_steps": 10, "max_grad_norm": 0.0, **RAMP, **overrides})
    trainer = StabilityTrainer(tiny_bert(tokenizer), args, train_dataset=dataset)
    probe = StepRows()
    trainer.add_callback(probe)
    return trainer, probe


def test_each_step_consumes_the_ramp_and_trainer_accounting_holds(tmp_path, bert_tokenizer, dataset):
    trainer, probe = ramp_trainer(tmp_path / "ramp", bert_tokenizer, dataset)
    trainer.train()
    consumed = 0
    for step, size in enumerate(SIZES, start=1):
        assert probe.rows[step] == stream(dataset, consumed, size), f"step {step}"
        consumed += size
    entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["stability/global_batch_size"] for entry in entries] == SIZES
    assert entries[-1]["stability/consumed_samples"] == sum(SIZES)
    assert trainer.state.global_step == 10 and trainer.state.epoch == pytest.approx(10 / 8)
    # The LR schedule follows steps: Trainer's linear decay over max_steps, as without the ramp.
    lrs = [1e-3 * (1 - (step - 1) / 10) for step in range(1, 11)]
    assert [entry["learning_rate"] for entry in entries] == pytest.approx(lrs)


def token_mean_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy summed over label tokens, divided by the step's label count (Trainer passes it)."""
    logits = outputs["logits"].flatten(0, 1).float()
    total = torch.nn.functional.cross_entropy(logits, labels.flatten(), reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum())


@pytest.mark.parametrize("normalisation", ["micro_batch_mean", "token_mean"])
def test_a_ramp_step_has_the_gradient_of_its_samples(tmp_path, bert_tokenizer, dataset, normalisation):
    """Step 3 runs 2 of 4 micro-batch slots: the loss is normalised over the 2 real micro-batches only.

    ``micro_batch_mean``: the model's own mean loss, Trainer divides by the number of micro-batches (2, not 4).
    ``token_mean``: a loss normalised by ``num_items_in_batch``, the label tokens of the real micro-batches.
    """
    captured = {}

    class Capture(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                captured["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                captured["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    args = training_args(tmp_path, **{**RAMP, "max_steps": 3, "max_grad_norm": 0.0, "learning_rate": 1e-2})
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset,
                               compute_loss_func=token_mean_loss if normalisation == "token_mean" else None)
    # BERT's forward takes **kwargs but ignores `num_items_in_batch`: let Trainer divide by the micro-batch count.
    trainer.model_accepts_loss_kwargs = False
    trainer.add_callback(Capture())
    reference = tiny_bert(bert_tokenizer)
    for module in [*trainer.model.modules(), *reference.modules()]:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the same function in both
    trainer.train()
    reference.load_state_dict(captured["weights"])
    rows = dataset.select(range(8, 16))  # step 3: samples 8..15 of the stream, micro-batches 8..11 and 12..15
    batch = {key: torch.tensor(rows[key]) for key in ("input_ids", "attention_mask", "labels")}
    if normalisation == "token_mean":
        token_mean_loss(reference(**batch), batch["labels"]).backward()
    else:
        micro = [{key: value[i : i + 4] for key, value in batch.items()} for i in (0, 4)]
        ((reference(**micro[0]).loss + reference(**micro[1]).loss) / 2).backward()
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(captured["grads"][name], parameter.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("ignore_data_skip", [False, True])
def test_a_resumed_run_continues_the_ramp_where_it_stopped(tmp_path, bert_tokenizer, dataset, ignore_data_skip):
    """With ``ignore_data_skip`` Trainer skips no batch of the resumed epoch: the ramp must not restart at 4."""
    whole, whole_rows = ramp_trainer(tmp_path / "whole", bert_tokenizer, dataset)
    whole.train()

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    first, _ = ramp_trainer(tmp_path / "run", bert_tokenizer, dataset, save_strategy="steps", save_steps=3)
    first.add_callback(StopAt())
    first.train()
    resumed, resumed_rows = ramp_trainer(tmp_path / "run", bert_tokenizer, dataset, ignore_data_skip=ignore_data_skip)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert sorted(resumed_rows.rows) == list(range(4, 11))
    for step in range(4, 11):
        assert resumed_rows.rows[step] == whole_rows.rows[step], f"step {step}"
    entries = [entry for entry in resumed.state.log_history if "loss" in entry and entry["step"] > 3]
    assert [entry["stability/global_batch_size"] for entry in entries] == SIZES[3:]


def test_ramp_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="batch_ramp_increment"):
        StabilityConfig(str(tmp_path), **{**RAMP, "batch_ramp_increment": 5})
    with pytest.raises(ValueError, match="batch_ramp_start"):
        StabilityConfig(str(tmp_path), **{**RAMP, "batch_ramp_start": 16})
    with pytest.raises(ValueError, match="batch_ramp_length"):
        StabilityConfig(str(tmp_path), **{**RAMP, "batch_ramp_length": 0})
    with pytest.raises(ValueError, match="batch_ramp_unit"):
        StabilityConfig(str(tmp_path), batch_ramp_unit="tokens")


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_length_grouping_is_refused_not_silently_dropped(tmp_path, bert_tokenizer, dataset, strategy):
    args = training_args(tmp_path, **{**RAMP, "train_sampling_strategy": strategy})
    with pytest.raises(ValueError, match=f"`train_sampling_strategy={strategy!r}` cannot be combined with the batch"):
        StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)


def test_start_must_be_whole_micro_batches(tmp_path, bert_tokenizer, dataset):
    args = training_args(tmp_path, **{**RAMP, "batch_ramp_start": 2, "batch_ramp_increment": 2})
    with pytest.raises(ValueError, match="batch_ramp_start"):
        StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)


@pytest.mark.distributed
def test_two_ranks_share_each_step_of_the_ramp(tmp_path):
    run_two_ranks("tests.scripts.batch_ramp_two_ranks", tmp_path, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    consumed = 0
    for step, size in enumerate([8, 8, 16, 16, 16, 16], start=1):  # micro 4 x 2 ranks, +8 after 16 samples
        indices = [ranks[rank]["steps"][str(step)] for rank in (0, 1)]
        assert [len(i) for i in indices] == [size // 2] * 2, f"step {step}"
        expected = [ranks[0]["canonical"][i] for i in range(consumed, consumed + size)]  # same on both ranks
        assert sorted(indices[0] + indices[1]) == sorted(expected), f"step {step}"
        consumed += size
