"""`hf-stability report OUTPUT_DIR --bad-samples` on a real recipe run: the samples by index with their events and
their decoded rows; the commands the doctor prints leave them out of a resume and of a rerun.

The run's ``stability_bad_samples.json`` is written by hand (sample 3 named at two steps, sample 7 at one), so
that the listing and the exclude list are tested apart from the run's own recording of bad samples.
"""

from __future__ import annotations

import json
import re
import shlex

import datasets
from transformers import AutoTokenizer

from hf_stability.cli import main as cli
from hf_stability.doctor import BAD_SAMPLES_FILENAME, diagnose
from hf_stability.exclude import read_exclude_list
from hf_stability.pretrain import main
from hf_stability.pretrain.run import parse_recipe_args
from hf_stability.report import EXCLUDED_FILENAME
from hf_stability.sample_report import DATA_FILENAME, bad_samples_listing, write_data_reference
from tests.integration.recipes.recipe_utils import TINY_RUN, load_recipe

BAD = {
    "3": [{"step": 1, "event": "skip", "rank": 0, "micro_batch": 0, "index_kind": "dataset_index"},
          {"step": 2, "event": "rollback", "rank": 0, "micro_batch": 0, "index_kind": "dataset_index", "loss": 9.5}],
    "7": [{"step": 1, "event": "skip", "rank": 0, "micro_batch": 0, "index_kind": "dataset_index"}],
}


def test_report_lists_the_bad_samples_with_their_rows_and_the_doctors_commands_exclude_them(tmp_path, capsys):
    bert = load_recipe("bert").BERT
    output_dir = tmp_path / "run"
    main(bert, ["--output_dir", str(output_dir), *TINY_RUN, "--max_steps", "2"])
    (output_dir / BAD_SAMPLES_FILENAME).write_text(json.dumps(BAD))
    capsys.readouterr()

    assert cli(["report", str(output_dir), "--bad-samples", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [sample["index"] for sample in listing["samples"]] == [3, 7] and listing["text_unavailable"] is None
    assert listing["samples"][0]["events"] == BAD["3"]
    # The text is the recipe's packed row, decoded: the rows and tokenizer the run recorded, read back here.
    reference = json.loads((output_dir / DATA_FILENAME).read_text())
    assert reference["tokenizer"] == "." and reference["rows"] == ["stability_train_rows.parquet"]  # movable
    rows = datasets.Dataset.from_parquet(str(output_dir / reference["rows"][0]))
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    for sample in listing["samples"]:
        assert sample["text"] == tokenizer.decode(rows[sample["index"]]["input_ids"])
        assert sample["text"].startswith("[CLS]") and sample["text"].count("[SEP]") == 2  # an NSP pair

    assert cli(["report", str(output_dir), "--bad-samples"]) == 0
    text = capsys.readouterr().out
    assert ("  sample 3:\n    step 1, rank 0, micro-batch 0: skip\n"
            "    step 2, rank 0, micro-batch 0: rollback, loss 9.5") in text
    assert f"text: {listing['samples'][1]['text'][:200]!r}" in text

    # The doctor's remedy: a resume with `auto` leaves the listed samples out, and so does the rerun's path.
    (remedy, *_), = (finding.remedy for finding in diagnose(output_dir) if finding.rule == "recurring_samples")
    resume, rerun = (shlex.split(command) for command in re.findall(r"`(--exclude_samples [^`]+)`", remedy))
    main(bert, ["--output_dir", str(output_dir), *TINY_RUN, "--max_steps", "3", *resume])
    record = json.loads((output_dir / EXCLUDED_FILENAME).read_text())
    assert record["samples"] == [3, 7] and record["exclude_samples"] == "auto"
    assert "excluded samples: 2" in (cli(["report", str(output_dir), "--no-plot"]), capsys.readouterr().out)[1]
    assert "Training samples left out (`exclude_samples`, known bad): **2**" in (output_dir / "README.md").read_text()
    training_args = parse_recipe_args(bert, ["--output_dir", str(tmp_path / "rerun"), *rerun])[-1]
    assert read_exclude_list(training_args.exclude_samples, training_args.output_dir) == {3, 7}


def test_rows_in_cache_files_are_referenced_not_copied_and_decode_by_index(tmp_path, bert_tokenizer):
    """Rows from a data file live in `datasets`' Arrow cache files: the reference names them (no copy), and the
    listing decodes row i of them; the tokenizer is found by absolute path from any working directory."""
    texts = ["the first row of a file", "a second, poisoned row", "and the third one"]
    datasets.Dataset.from_dict({"input_ids": bert_tokenizer(texts)["input_ids"]}).save_to_disk(tmp_path / "rows")
    rows = datasets.load_from_disk(str(tmp_path / "rows"))
    bert_tokenizer.save_pretrained(tmp_path / "tokenizer")
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    write_data_reference(output_dir, rows, str(tmp_path / "tokenizer"))
    reference = json.loads((output_dir / DATA_FILENAME).read_text())
    assert reference["rows"] == [entry["filename"] for entry in rows.cache_files]
    assert reference["tokenizer"] == str((tmp_path / "tokenizer").resolve())
    assert not (output_dir / "stability_train_rows.parquet").exists()
    (output_dir / BAD_SAMPLES_FILENAME).write_text(json.dumps({"1": [{"step": 4, "event": "skip"}]}))
    (sample,) = bad_samples_listing(output_dir)["samples"]
    assert sample["text"] == "[CLS] a second, poisoned row [SEP]"
