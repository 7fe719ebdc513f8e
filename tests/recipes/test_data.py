"""Document loading for the recipes: embedded corpus, local text/json/parquet files, streaming, packing."""

from __future__ import annotations

import json

import datasets
import pytest

from hf_stability.corpus import default_corpus
from hf_stability.pretrain import DataArguments, load_documents, pack_token_streams


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
