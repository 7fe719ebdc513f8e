"""Document loading for the recipes: embedded corpus, local text/json/parquet files, streaming, packing."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pytest

from hf_stability.corpus import default_corpus
from hf_stability.pretrain import DataArguments, InputError, load_documents, pack_token_streams
from tests.integration.recipes.recipe_utils import RECIPES


def test_default_corpus_holds_out_every_document_with_index_mod_100_below_the_percentage():
    corpus = default_corpus()
    train, validation = load_documents(DataArguments(validation_split_percentage=5))
    assert validation["text"] == corpus[:5]
    assert train["text"] == corpus[5:]
    assert train.column_names == ["text"]


def test_streaming_gives_the_same_documents_lazily():
    train, validation = load_documents(DataArguments(streaming=True))
    assert isinstance(train, datasets.IterableDataset)
    assert [row["text"] for row in validation] == default_corpus()[:5]
    assert next(iter(train))["text"] == default_corpus()[5]


def test_text_files_are_split_into_documents_by_paragraph_or_line(tmp_path):
    train_file, validation_file = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_file.write_text("First doc. Two sentences.\nSame paragraph.\n\nSecond doc here.\n")
    validation_file.write_text("Held out.\n")
    train, validation = load_documents(DataArguments(train_file=str(train_file), validation_file=str(validation_file)))
    assert len(train) == 2 and train[1]["text"].strip() == "Second doc here."
    assert [text.strip() for text in validation["text"]] == ["Held out."]
    by_line, _ = load_documents(
        DataArguments(train_file=str(train_file), text_sample_by="line", validation_split_percentage=0)
    )
    assert [text for text in by_line["text"] if text.strip()] == [
        "First doc. Two sentences.",
        "Same paragraph.",
        "Second doc here.",
    ]


def test_jsonl_file_with_another_text_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "content": f"Document {i}."}) + "\n" for i in range(150)))
    train, validation = load_documents(
        DataArguments(train_file=str(path), text_column_name="content", validation_split_percentage=2)
    )
    assert train.column_names == ["text"]
    assert validation["text"] == ["Document 0.", "Document 1.", "Document 100.", "Document 101."]
    assert len(train) == 146
    with pytest.raises(ValueError, match="text_column_name"):
        load_documents(DataArguments(train_file=str(path)))


def test_parquet_file(tmp_path):
    path = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"text": [f"Doc {i}." for i in range(4)]}).to_parquet(str(path))
    train, validation = load_documents(DataArguments(train_file=str(path), validation_split_percentage=0))
    assert train["text"] == [f"Doc {i}." for i in range(4)] and validation is None


def test_bad_files_are_errors_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="train_file"):
        load_documents(DataArguments(train_file=str(tmp_path / "corpus.csv")))
    with pytest.raises(ValueError, match="train_file"):
        load_documents(DataArguments(train_file=str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="validation_file"):
        load_documents(DataArguments(validation_file=str(tmp_path / "valid.txt")))


def test_pack_token_streams_cuts_exact_blocks_across_documents_and_drops_the_tail():
    blocks = list(pack_token_streams([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4))
    assert blocks == [[1, 2, 3, 4], [5, 6, 7, 8]]


BAD_FILES = [
    ("empty.txt", b"", "is empty"),
    ("blank.jsonl", b"\n  \n", "is empty"),
    ("latin1.txt", b"First line.\nCaf\xe9 au lait.\n", r"not UTF-8 text: byte 0xe9 on line 2"),
    ("random.txt", bytes(range(128, 256)) * 4, r"not UTF-8 text: byte 0x80 on line 1"),
    ("nul.txt", b"Some text.\nMore\x00text.\n", r"binary, not text: a NUL byte on line 2"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', r"line 2 is not valid JSON"),
    ("array.jsonl", b'{"text": "a"}\n["b"]\n', r"line 2 is a JSON list, not an object"),
    ("mixed.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": 5}\n', r"line 3: 'text' is 5 \(int\), not a string"),
    ("ints.jsonl", b'{"text": 1}\n{"text": 2}\n', r"line 1: 'text' is 1 \(int\), not a string"),
    ("null.jsonl", b'{"text": "a"}\n{"text": null}\n', r"line 2: 'text' is None \(NoneType\)"),
    ("missing.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"line 2 has no 'text' key"),
    ("records.json", b'[\n {"text": "a"},\n {"text": 7}\n]\n', r"record 1: 'text' is 7"),
    ("broken.json", b'[\n {"text": "a"},\n {"text": }\n]\n', r"line 3 is not valid JSON"),
    ("fake.parquet", b"not a parquet file", r"not a Parquet file"),
]


@pytest.mark.parametrize(("name", "content", "cause"), BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_unreadable_data_file_is_one_error_naming_file_line_and_cause(tmp_path, name, content, cause):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=rf"`train_file` .*{name}.*{cause}") as caught:
        load_documents(DataArguments(train_file=str(path)))
    assert "\n" not in str(caught.value)


def test_bad_validation_file_is_named_as_the_validation_file(tmp_path):
    train, validation = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text('{"text": "a"}\n{"text": "b"}\n')
    validation.write_text('{"text": "a"}\n{"text": 3.5}\n')
    with pytest.raises(InputError, match=r"`validation_file` .*valid\.jsonl: line 2: 'text' is 3.5"):
        load_documents(DataArguments(train_file=str(train), validation_file=str(validation)))


def test_non_string_parquet_column_and_directories_are_named(tmp_path):
    path = tmp_path / "numbers.parquet"
    datasets.Dataset.from_dict({"text": [1, 2, 3]}).to_parquet(str(path))
    with pytest.raises(InputError, match=r"numbers\.parquet: column 'text' holds int64 values, not strings"):
        load_documents(DataArguments(train_file=str(path)))
    folder = tmp_path / "corpus.txt"
    folder.mkdir()
    with pytest.raises(InputError, match=r"`train_file` .*corpus\.txt' is a directory"):
        load_documents(DataArguments(train_file=str(folder)))


def test_streamed_file_is_checked_before_training(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"Caf\xe9.\n")
    with pytest.raises(InputError, match="not UTF-8"):
        load_documents(DataArguments(train_file=str(latin), streaming=True))
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 4}\n')
    with pytest.raises(InputError, match=r"line 1: 'text' is 4"):
        load_documents(DataArguments(train_file=str(numbers), streaming=True))


def test_recipe_reports_a_bad_data_file_in_one_line_before_training(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "Fine."}\n{"text": "Broken.\n')
    command = [sys.executable, str(RECIPES / "t5_pretrain.py"), "--output_dir", str(tmp_path / "out")]
    result = subprocess.run([*command, "--train_file", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1
    assert "`train_file`" in lines[0] and "corpus.jsonl: line 2 is not valid JSON" in lines[0]
