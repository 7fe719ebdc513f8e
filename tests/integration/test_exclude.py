"""The exclude list: a run fed poisoned samples skips steps; a rerun (or resume) that excludes them never sees them
and skips nothing, with random, sequential and length-grouped sampling, the batch ramp, an IterableDataset and a
plain `Trainer` with the documented sampler wrapper.

The poison is real: a poisoned sample's input embeddings are NaN, so its micro-batch's loss and gradients are NaN
and `SkipNonFiniteCallback` skips the step. The bad-samples files these tests read are written by hand (listing the
poisoned indices), so that the exclude list is tested apart from the run's own recording of bad samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset
from transformers import Trainer, default_data_collator
from transformers.trainer_pt_utils import LengthGroupedSampler

from hf_stability import StabilityTrainer, read_events
from hf_stability.cli import main as cli
from hf_stability.doctor import BAD_SAMPLES_FILENAME
from hf_stability.exclude import ExcludeSamplesSampler, excluding_sampler, read_exclude_list
from hf_stability.report import EXCLUDED_FILENAME
from tests.testing_utils import mlm_dataset, tiny_bert, training_args

ROWS = 32
POISONED = (5, 18, 27)


class Rows(Dataset):
    """The MLM rows, each carrying its dataset index (popped by `Feed` before the model sees the batch)."""

    def __init__(self, rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, **self.rows[index]}


class Stream(IterableDataset):
    """The same rows as a stream: the index is the stream position."""

    def __init__(self, rows) -> None:
        self.rows = rows

    def __iter__(self):
        return ({"index": position, **row} for position, row in enumerate(self.rows))


class Feed:
    """Collator that poisons the `POISONED` samples: their input embeddings (from the model's own embedding table)
    become NaN. It passes the batch's indices on as ``index``, for `Recorded` to record."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        indices = [feature.pop("index") for feature in features]
        batch = default_data_collator(features)
        poisoned = [row for row, index in enumerate(indices) if index in POISONED]
        if poisoned:
            with torch.no_grad():
                embeds = self.model.get_input_embeddings()(batch.pop("input_ids"))
            embeds[poisoned] = float("nan")
            batch["inputs_embeds"] = embeds
        batch["index"] = torch.tensor(indices)
        return batch


class Recorded:
    """Trainer mixin recording the indices of every micro-batch trained, in order (not the ones only collated:
    accelerate's loader fetches a batch ahead, and a resume collates the batches it skips)."""

    fed: list[int]

    def training_step(self, model, inputs, num_items_in_batch=None):
        index = inputs.pop("index", None)  # None: a placeholder of the batch ramp
        if index is not None:
            self.fed += index.tolist()
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.fixture(scope="module")
def rows(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=ROWS)


def bad_samples_file(path: Path) -> Path:
    """A bad-samples file listing `POISONED`, written by hand in the shape a run writes."""
    event = {"step": 1, "event": "skip", "rank": 0, "micro_batch": 0, "loss": float("nan")}
    path.write_text(json.dumps({str(i): [event] for i in POISONED}))
    return path


def train(tmp_path, tokenizer, dataset, trainer_class=StabilityTrainer, resume: bool = False, **overrides):
    """One real run (batch 4, no column removal so `Feed` gets the index); returns the trainer, the indices it
    trained and the skipped steps."""
    args = training_args(tmp_path, **{"per_device_train_batch_size": 4, "max_steps": -1, "num_train_epochs": 1,
                                      "remove_unused_columns": False, **overrides})
    model = tiny_bert(tokenizer)
    trainer = type(f"Recorded{trainer_class.__name__}", (Recorded, trainer_class), {})(
        model, args, train_dataset=dataset, data_collator=Feed(model))
    trainer.fed = []
    trainer.train(resume_from_checkpoint=resume or None)
    skips = [event["step"] for event in read_events(tmp_path) if event["event"] == "skip"]
    return trainer, trainer.fed, skips


def test_random_order_run_skips_the_poisoned_samples_and_a_rerun_excluding_them_skips_none(
    tmp_path, bert_tokenizer, rows, caplog, capsys
):
    _, fed, skips = train(tmp_path / "poisoned", bert_tokenizer, Rows(rows), train_sampling_strategy="random")
    assert sorted(fed) == list(range(ROWS)) and fed != sorted(fed)  # one shuffled epoch
    assert skips == sorted({fed.index(i) // 4 + 1 for i in POISONED})  # the steps that held a poisoned sample

    listed = bad_samples_file(tmp_path / "bad.json")
    with caplog.at_level("INFO", logger="hf_stability"):
        trainer, refed, reskips = train(tmp_path / "rerun", bert_tokenizer, Rows(rows),
                                        train_sampling_strategy="random", exclude_samples=str(listed))
    assert reskips == [] and not set(refed) & set(POISONED)
    # The same seeded permutation, less the excluded samples; the epoch is shorter by them.
    assert refed == [i for i in fed if i not in POISONED]
    assert trainer.state.global_step == -(-(ROWS - len(POISONED)) // 4)
    assert f"Excluding {len(POISONED)} sample(s) (dataset indices) listed in {listed}" in caplog.text
    record = json.loads((tmp_path / "rerun" / EXCLUDED_FILENAME).read_text())
    assert record["samples"] == list(POISONED) and record["index_kind"] == "dataset_index"

    # The report on this run directory (a script's run: no recorded data, so no text), and its JSON.
    bad_samples_file(tmp_path / "rerun" / BAD_SAMPLES_FILENAME)
    capsys.readouterr()
    assert cli(["report", str(tmp_path / "rerun"), "--bad-samples", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(s["index"], s["events"][0]["step"], s["events"][0]["loss"], s["text"]) for s in listing["samples"]] == [
        (i, 1, "nan", None) for i in POISONED]  # strict JSON: the NaN loss as a string
    assert "no stability_data.json" in listing["text_unavailable"] and listing["excluded"]["samples"] == [5, 18, 27]
    assert cli(["report", str(tmp_path / "rerun"), "--bad-samples"]) == 0
    text = capsys.readouterr().out
    assert "this run left out 3 sample(s) (dataset_index)" in text
    assert "text unavailable: no stability_data.json" in text
    assert "  sample 18:\n    step 1, rank 0, micro-batch 0: skip, loss nan\n  sample 27:" in text
    with pytest.raises(SystemExit, match="2"):
        cli(["report", str(tmp_path / "rerun"), "--json"])  # --json lists bad samples only


def test_auto_on_resume_leaves_out_what_the_earlier_run_listed(tmp_path, bert_tokenizer, rows):
    # Sequential: steps 1-2 feed rows 0-7, then the poisoned rows come at steps 2, 5 and 7.
    _, fed, skips = train(tmp_path, bert_tokenizer, Rows(rows), save_strategy="steps", save_steps=1,
                          exclude_samples="auto", max_steps=2)
    assert fed == list(range(8)) and (tmp_path / "checkpoint-2").is_dir()
    assert skips == [2]  # sample 5
    assert json.loads((tmp_path / EXCLUDED_FILENAME).read_text())["samples"] == []  # 'auto', no file yet: none
    bad_samples_file(tmp_path / BAD_SAMPLES_FILENAME)  # what the first run found, in its own output directory
    trainer, refed, reskips = train(tmp_path, bert_tokenizer, Rows(rows), resume=True, exclude_samples="auto",
                                    save_strategy="no")
    kept = [i for i in range(ROWS) if i not in POISONED]
    assert refed == kept[8:]  # the resumed epoch skips its 2 trained batches of the kept order
    assert [step for step in reskips if step > 2] == []
    assert trainer.state.global_step == -(-len(kept) // 4)


@pytest.mark.parametrize("case", ["sequential", "group_by_length", "batch_ramp", "stream"])
def test_every_sampling_leaves_the_excluded_samples_out(case, tmp_path, bert_tokenizer, rows):
    listed = bad_samples_file(tmp_path / "bad.json")
    kept = [i for i in range(ROWS) if i not in POISONED]
    settings: dict[str, Any] = {"exclude_samples": str(listed)}
    dataset: Dataset = Rows(rows)
    if case == "group_by_length":
        settings["train_sampling_strategy"] = "group_by_length"
    elif case == "batch_ramp":  # 4 then 8 samples per step: 2 micro-batches of 4 at the target
        settings.update(gradient_accumulation_steps=2, batch_ramp_start=4, batch_ramp_increment=4,
                        batch_ramp_length=8, max_steps=4)
    elif case == "stream":
        dataset, settings["max_steps"] = Stream(rows), 7
    trainer, fed, skips = train(tmp_path, bert_tokenizer, dataset, **settings)
    assert skips == []
    if case == "group_by_length":
        sampler = trainer.get_train_dataloader().batch_sampler.sampler
        assert isinstance(sampler, ExcludeSamplesSampler) and isinstance(sampler.sampler, LengthGroupedSampler)
        assert sorted(fed) == kept and len(sampler) == len(kept)
    elif case == "batch_ramp":  # steps of 4, 4, 8, 8 samples: the stream over the kept indices, in order
        assert fed == kept[:24]
    else:  # the sequential epoch (8 steps), the stream's 7 steps of 4
        assert fed == kept[: 7 * 4 if case == "stream" else None]


class ExcludingTrainer(Trainer):
    """A plain Trainer leaving the samples of a bad-samples file out (as docs/doctor.md shows it)."""

    def _get_train_sampler(self, train_dataset=None):
        excluded = read_exclude_list(self.args.exclude_samples, self.args.output_dir)
        return excluding_sampler(super()._get_train_sampler(train_dataset), excluded, self.args)


def test_a_plain_trainer_with_the_sampler_wrapper_never_sees_the_excluded_samples(tmp_path, bert_tokenizer, rows):
    listed = bad_samples_file(tmp_path / "bad.json")
    _, fed, _ = train(tmp_path, bert_tokenizer, Rows(rows), trainer_class=ExcludingTrainer,
                      train_sampling_strategy="random", exclude_samples=str(listed))
    assert sorted(fed) == [i for i in range(ROWS) if i not in POISONED] and fed != sorted(fed)


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "is not a file"), ("{not json", "is not valid JSON"), ('{"3": 1}', "expected")],
)
def test_a_bad_exclude_list_is_one_line_naming_the_setting_and_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"^`exclude_samples`: .*{problem}") as raised:
        training_args(tmp_path, exclude_samples=str(path))
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    assert read_exclude_list("auto", tmp_path) == frozenset()  # 'auto' without the file: nothing to leave out
