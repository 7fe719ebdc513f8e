"""Bad-batch forensics (`hf_stability.samples`): the events name exactly the samples of the batches involved.

The fault travels with the data: chosen rows start with a token no other row holds, and a forward hook on the
embeddings turns every row holding it NaN (`poison_samples`, `poison_embeddings`), so the loss and gradients of
any micro-batch holding such a sample are NaN, and so is that sample's own loss when recomputed. The batches the
collator really built are recorded (`Collated`): an event's indices must read back those very rows.
"""

from __future__ import annotations

import json
import math
import shutil
from typing import Any

import pytest
import torch
from transformers import default_data_collator

from hf_stability import StabilityTrainer
from hf_stability.doctor import diagnose, read_bad_samples
from hf_stability.samples import BAD_SAMPLES_FILENAME, DATASET_INDEX, STREAM_POSITION
from tests.testing_utils import (
    NoLabelBatches,
    PoisonActivations,
    bart_layout_model,
    mlm_dataset,
    poison_embeddings,
    poison_samples,
    run_two_ranks,
    seq2seq_dataset,
    tiny_bert,
    training_args,
)

POISONED = {5, 40}


class Collated:
    """The user's collator, recording the rows (``input_ids``) of every batch it builds."""

    def __init__(self) -> None:
        self.batches: set[tuple[tuple[int, ...], ...]] = set()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = default_data_collator(features)
        self.batches.add(tuple(map(tuple, batch["input_ids"].tolist())))
        return batch


@pytest.fixture(scope="module")
def poisoned(bert_tokenizer):
    """64 rows, rows `POISONED` poisoned, and the poison token."""
    token = len(bert_tokenizer) - 1
    return poison_samples(mlm_dataset(bert_tokenizer, rows=64), POISONED, token), token


def train(output_dir, tokenizer, poisoned, train_dataset=None, resume=None, callbacks=None, **overrides) -> Collated:
    dataset, token = poisoned
    model = tiny_bert(tokenizer)
    poison_embeddings(model, token)
    collated = Collated()
    args = training_args(output_dir, per_device_train_batch_size=4, logging_steps=100, **overrides)
    trainer = StabilityTrainer(model, args, train_dataset=dataset if train_dataset is None else train_dataset,
                               data_collator=collated, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return collated


def events(output_dir, kind: str | None = None) -> list[dict[str, Any]]:
    lines = (output_dir / "stability_events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if kind is None or e["event"] == kind]


def assert_names_its_batches(event: dict[str, Any], dataset, collated: Collated, kind: str = DATASET_INDEX) -> None:
    """The event's micro-batches are batches the collator built, read back by index; the worst sample is a poisoned
    one, with a NaN loss, in a micro-batch that holds it."""
    assert event["index_kind"] == kind
    (rank,) = event["samples"]
    assert rank["rank"] == 0 and rank["micro_batches"]
    for indices in rank["micro_batches"]:
        assert tuple(map(tuple, dataset[indices]["input_ids"])) in collated.batches
    worst = event["worst_samples"][0]
    assert worst["index"] in POISONED and worst["loss"] == "nan"
    assert worst["index"] in rank["micro_batches"][worst["micro_batch"]]
    assert all(math.isfinite(w["loss"]) for w in event["worst_samples"][1:] if w["index"] not in POISONED)


def test_random_sampling_with_accumulation_names_the_poisoned_samples_also_after_a_resume(
        tmp_path, bert_tokenizer, poisoned):
    """Two epochs: each poisoned sample is skipped once per epoch, so the doctor's recurring-samples rule fires on
    the file the run wrote, and a rerun excluding its samples skips nothing. A run resumed at the epoch boundary
    names the same samples at the same steps."""
    dataset = poisoned[0]
    first = tmp_path / "first"
    settings = dict(max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=2, train_sampling_strategy="random",
                    save_strategy="steps", save_steps=8)
    collated = train(first, bert_tokenizer, poisoned, **settings)
    skips = events(first, "skip")
    for event in skips:
        assert_names_its_batches(event, dataset, collated)
        assert len(event["samples"][0]["micro_batches"]) == 2
    bad = read_bad_samples(first)
    assert set(bad) == POISONED
    for named in bad.values():
        assert len({e["step"] for e in named}) == 2 and {e["event"] for e in named} == {"skip"}
        assert all(e["loss"] == "nan" and e["index_kind"] == DATASET_INDEX for e in named)
    assert {e["step"] for named in bad.values() for e in named} == {e["step"] for e in skips}
    findings = {finding.rule: finding for finding in diagnose(first)}
    assert findings["recurring_samples"].samples == sorted(POISONED)
    # The file the run wrote, as the exclude list of a rerun: no skip left.
    rerun = tmp_path / "rerun"
    fed = train(rerun, bert_tokenizer, poisoned, **{**settings, "save_strategy": "no"},
                exclude_samples=str(first / BAD_SAMPLES_FILENAME))
    rows = {row for batch in fed.batches for row in batch}
    assert len(rows) == 64 - len(POISONED) and not rows & {tuple(dataset[i]["input_ids"]) for i in POISONED}
    assert not (rerun / "stability_events.jsonl").exists() or events(rerun, "skip") == []

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-8", resumed / "checkpoint-8")
    earlier = {str(i): [e for e in named if e["step"] <= 8] for i, named in bad.items()}
    (resumed / BAD_SAMPLES_FILENAME).write_text(json.dumps({i: named for i, named in earlier.items() if named}))
    train(resumed, bert_tokenizer, poisoned, resume=str(resumed / "checkpoint-8"), **settings)
    later = [{k: e[k] for k in ("step", "samples", "worst_samples")} for e in skips if e["step"] > 8]
    assert later and [{k: e[k] for k in ("step", "samples", "worst_samples")} for e in events(resumed, "skip")] == later
    assert read_bad_samples(resumed) == bad  # merged into the file the resumed run found


class Stream(torch.utils.data.IterableDataset):
    """The rows of a dataset, in order, as a stream without a length."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)


@pytest.mark.parametrize("layout", ["group_by_length", "batch_ramp", "iterable"])
def test_length_grouping_the_batch_ramp_and_a_stream_name_the_poisoned_samples(
        tmp_path, bert_tokenizer, poisoned, layout):
    dataset = poisoned[0]
    overrides: dict[str, Any] = {"max_steps": -1, "num_train_epochs": 1}
    train_dataset = None
    if layout == "group_by_length":
        overrides["train_sampling_strategy"] = "group_by_length"
    elif layout == "batch_ramp":
        # Global batches 4, 4, 8, 12, 16, 16, 16: 7 steps take 76 samples of the stream, all 64 rows once.
        overrides = dict(max_steps=7, gradient_accumulation_steps=4, batch_ramp_start=4, batch_ramp_increment=4,
                         batch_ramp_length=24, train_sampling_strategy="random")
    else:
        train_dataset, overrides = Stream(dataset), {"max_steps": 16}
    collated = train(tmp_path, bert_tokenizer, poisoned, train_dataset=train_dataset, **overrides)
    skips = events(tmp_path, "skip")
    kind = STREAM_POSITION if layout == "iterable" else DATASET_INDEX
    for event in skips:  # the stream's positions are its rows' indices: it yields them in order
        assert_names_its_batches(event, dataset, collated, kind)
    assert set(read_bad_samples(tmp_path)) == POISONED
    if layout == "batch_ramp":  # the first steps run fewer real micro-batches than gradient_accumulation_steps
        sizes = {e["step"]: len(e["samples"][0]["micro_batches"]) for e in skips}
        assert all(size <= 4 for size in sizes.values())


def test_a_rollback_names_the_spiking_step_and_the_steps_since_the_restored_snapshot(
        tmp_path, bert_tokenizer, poisoned):
    """Sequential sampling: step s (from 1) holds samples 4(s-1) .. 4s-1, so sample 40 spikes step 11. A NaN forward
    during step 6 alone (no sample to blame) spikes too: the replay tells the two apart."""
    train(tmp_path, bert_tokenizer, poisoned, callbacks=[PoisonActivations([5])], max_steps=14, skip_nonfinite=False,
          spike_rollback=True, snapshot_interval=4, spike_check_interval=2, spike_warmup=2, spike_window=8,
          spike_sigma=100.0, spike_replay=True)
    batch = {step: [list(range(4 * (step - 1), 4 * step))] for step in range(1, 15)}
    replays = {e["spike_step"]: e["replay"] for e in events(tmp_path, "rollback")}
    assert {step: replay["reproduced"] for step, replay in replays.items()} == {2: True, 6: False, 11: True}
    assert replays[11]["loss"] == "nan" and math.isfinite(replays[6]["loss"]) and replays[6]["grad_norm"] > 0
    (rollback,) = [e for e in events(tmp_path, "rollback") if e["spike_step"] == 11]
    assert rollback["samples"] == [{"rank": 0, "micro_batches": batch[11]}]
    assert rollback["worst_samples"][0] == {"rank": 0, "index": 40, "micro_batch": 0, "loss": "nan"}
    restored = rollback["restored_step"]
    assert rollback["between_steps"] == [{"step": s, "samples": [{"rank": 0, "micro_batches": batch[s]}]}
                                         for s in range(restored + 1, 11)]
    assert rollback["between_truncated"] == 0
    # The NaN update left non-finite weights: blamed are only the samples NaN on the restored weights.
    assert rollback["nonfinite_weights"]
    assert {i: [e["step"] for e in named] for i, named in read_bad_samples(tmp_path).items()} == {5: [2], 40: [11]}
    # The transient step's samples are not blamed: their own losses were finite on the restored weights.
    assert [e["reproduced"] for e in read_bad_samples(tmp_path)[40]] == [True]
    finding = next(f for f in diagnose(tmp_path) if f.rule == "recurring_samples")  # named once, but reproduced
    assert finding.samples == [5, 40] and "spiked again when their step was replayed" in finding.cause


@pytest.mark.distributed
def test_two_ranks_name_each_ranks_own_samples(tmp_path, bert_tokenizer):
    """Sample 6 reaches rank 1 at step 1, sample 33 rank 0 at step 5 (sequential batches of 4, dealt to the ranks
    in turn); with a stream, rank 0 reads both ranks' batches and accelerate dispatches them with their tags."""
    run_two_ranks("tests.scripts.samples_two_ranks", tmp_path, timeout=600)
    dataset = poison_samples(mlm_dataset(bert_tokenizer, rows=64), [6, 33], len(bert_tokenizer) - 1)  # the script's
    for run, kind in (("map", DATASET_INDEX), ("stream", STREAM_POSITION)):
        built = {rank: {tuple(map(tuple, batch)) for batch in json.loads((tmp_path / run / f"rank{rank}.json")
                                                                             .read_text())} for rank in (0, 1)}
        skips = events(tmp_path / run, "skip")
        assert [(e["step"], e["loss_ranks"]) for e in skips] == [(1, [1]), (5, [0])]
        for event in skips:
            assert event["index_kind"] == kind and [r["rank"] for r in event["samples"]] == [0, 1]
            for part in event["samples"]:
                (indices,) = part["micro_batches"]
                # A stream's batches are all built on rank 0, which dispatches them.
                assert tuple(map(tuple, dataset[indices]["input_ids"])) in built[part["rank"] if run == "map" else 0]
        assert [(w["rank"], w["index"], w["loss"]) for w in (e["worst_samples"][0] for e in skips)] == [
            (1, 6, "nan"), (0, 33, "nan")]
        assert {i: [(e["step"], e["rank"]) for e in named] for i, named in read_bad_samples(tmp_path / run).items()} \
            == {6: [(1, 1)], 33: [(5, 0)]}


@pytest.mark.parametrize("model", ["bert_mlm", "bart_seq2seq"])
def test_a_nonfinite_loss_names_the_batch_that_lost_its_labels(tmp_path, bert_tokenizer, model):
    """The third sequential batch (samples 8..11, step 3) has no label: its loss is 0/0 = NaN with finite
    gradients. No sample of it has a loss of its own (no label to score, with a masked LM and with a seq2seq model
    alike), so none is singled out: the event and the file name the whole batch. Spike rollback (on by default)
    rolls the NaN loss back."""
    args = training_args(tmp_path, max_steps=4, per_device_train_batch_size=4, logging_steps=100)
    if model == "bert_mlm":
        network, dataset = tiny_bert(bert_tokenizer), mlm_dataset(bert_tokenizer, rows=32)
    else:
        network, dataset = bart_layout_model(), seq2seq_dataset(rows=32)
    StabilityTrainer(network, args, train_dataset=dataset, data_collator=NoLabelBatches([2])).train()
    loss, rollback = events(tmp_path)
    assert (loss["event"], loss["step"], rollback["event"], rollback["spike_step"]) == (
        "nonfinite_loss", 3, "rollback", 3)
    for event in (loss, rollback):
        assert event["samples"] == [{"rank": 0, "micro_batches": [[8, 9, 10, 11]]}]
        assert "worst_samples" not in event  # a label-less row's 0/0 is no loss of its own
    bad = read_bad_samples(tmp_path)
    assert sorted(bad) == [8, 9, 10, 11]
    assert all([e["event"] for e in named] == ["nonfinite_loss", "rollback"] for named in bad.values())
    assert all("loss" not in e for named in bad.values() for e in named)
