"""Pre-training text: load documents, hold out a validation split, pack token streams into rows.

Every source ends up as a `datasets` dataset (or `IterableDataset` when streaming) with one document
per row in a ``text`` column: the embedded corpus, a Hub/local dataset, or local text/json/parquet files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets

from hf_stability.corpus import default_corpus
from hf_stability.pretrain.arguments import DataArguments

AnyDataset = datasets.Dataset | datasets.IterableDataset
FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
DEFAULT_CORPUS_NAME = "pydoc_data.topics (embedded default corpus)"


def describe_source(data_args: DataArguments) -> str:
    """A one-line name of the training data, for logs and the model card."""
    if data_args.dataset_name is not None:
        config = f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else ""
        return f"{data_args.dataset_name}{config}"
    if data_args.train_file is not None:
        return Path(data_args.train_file).name
    return DEFAULT_CORPUS_NAME


def load_documents(data_args: DataArguments) -> tuple[AnyDataset, AnyDataset | None]:
    """Return ``(train, validation)`` datasets with one document per row in a ``text`` column.

    ``validation`` is the source's own validation split when it has one, otherwise the documents
    whose index modulo 100 is below ``validation_split_percentage`` (``None`` when that is 0).
    """
    splits = _load_splits(data_args)
    if "train" not in splits:
        raise ValueError(f"The dataset {describe_source(data_args)!r} has no 'train' split; found {sorted(splits)}.")
    train, validation = splits["train"], splits.get("validation")
    column = data_args.text_column_name
    for name, split in (("train", train), ("validation", validation)):
        if split is not None and split.column_names is not None and column not in split.column_names:
            raise ValueError(
                f"`text_column_name` {column!r} is not a column of the {name} split; columns: {split.column_names}."
            )
    if validation is None and data_args.validation_split_percentage > 0:
        percentage = data_args.validation_split_percentage
        validation = train.filter(lambda _, index: index % 100 < percentage, with_indices=True)
        train = train.filter(lambda _, index: index % 100 >= percentage, with_indices=True)
    return _only_text(train, column), None if validation is None else _only_text(validation, column)


def _load_splits(data_args: DataArguments) -> dict[str, AnyDataset]:
    if data_args.dataset_name is not None:
        loaded = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, streaming=data_args.streaming
        )
        return dict(loaded)
    if data_args.train_file is not None:
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        builder = _file_builder(files)
        options = {"sample_by": data_args.text_sample_by} if builder == "text" else {}
        return dict(datasets.load_dataset(builder, data_files=files, streaming=data_args.streaming, **options))
    if data_args.validation_file is not None:
        raise ValueError("`validation_file` needs a `train_file`.")
    corpus = datasets.Dataset.from_dict({"text": default_corpus()})
    return {"train": corpus.to_iterable_dataset() if data_args.streaming else corpus}


def _file_builder(files: dict[str, str]) -> str:
    builders = set()
    for key, path in files.items():
        suffix = Path(path).suffix.lower()
        if suffix not in FILE_BUILDERS:
            raise ValueError(f"`{key}_file` {path!r} must end in one of {sorted(FILE_BUILDERS)}.")
        if not Path(path).is_file():
            raise ValueError(f"`{key}_file` {path!r} does not exist.")
        builders.add(FILE_BUILDERS[suffix])
    if len(builders) != 1:
        raise ValueError(f"`train_file` and `validation_file` must have the same format, got {sorted(builders)}.")
    return builders.pop()


def _only_text(dataset: AnyDataset, column: str) -> AnyDataset:
    if column != "text":
        dataset = dataset.rename_column(column, "text")
    others = [name for name in (dataset.column_names or []) if name != "text"]
    return dataset.remove_columns(others) if others else dataset


def map_documents(
    dataset: AnyDataset,
    function: Callable[[dict[str, list[Any]]], dict[str, list[Any]]],
    data_args: DataArguments,
    description: str,
) -> AnyDataset:
    """Apply a batched ``text`` → rows function, dropping the text column (streams stay lazy)."""
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(function, batched=True, remove_columns=["text"])
    return dataset.map(
        function,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=data_args.preprocessing_num_workers,
        desc=description,
    )


def pack_token_streams(token_lists: list[list[int]], block_size: int) -> Iterator[list[int]]:
    """Concatenate token lists and cut the stream into blocks of exactly ``block_size`` (the tail is dropped)."""
    stream = [token for tokens in token_lists for token in tokens]
    for start in range(0, len(stream) - block_size + 1, block_size):
        yield stream[start : start + block_size]


def take(dataset: AnyDataset, limit: int | None) -> AnyDataset:
    """The first ``limit`` rows (all rows when ``limit`` is None)."""
    if limit is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(limit)
    return dataset.select(range(min(limit, len(dataset))))
