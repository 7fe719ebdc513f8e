"""Pre-training text: load documents, hold out a validation split, pack token streams into rows.

Every source ends up as a `datasets` dataset (or `IterableDataset` when streaming) with one document
per row in a ``text`` column: the embedded corpus, a Hub/local dataset, or local text/json/parquet files.

Local files are checked before anything trains, and a file that cannot work is one `InputError` naming the
file (and the line) and the cause: a directory, an empty file, binary or non-UTF-8 bytes, a JSON line that
does not parse or is not an object, a text column that is not all strings, a Parquet file without its magic
bytes. `datasets` itself would raise a generic "error while generating the dataset", accept a JSON file whose
text column mixes strings and numbers (or cast the numbers to strings), or turn a NUL byte into text. The
checks read each local file once (streamed files too): cheap next to tokenising it.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import datasets
import pyarrow

from hf_stability.corpus import default_corpus
from hf_stability.pretrain.arguments import DataArguments
from hf_stability.pretrain.errors import InputError

AnyDataset: TypeAlias = datasets.Dataset | datasets.IterableDataset
_STRING_TYPES = ("string", "large_string")
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
        raise InputError(f"The dataset {describe_source(data_args)!r} has no 'train' split; found {sorted(splits)}.")
    train, validation = splits["train"], splits.get("validation")
    column = data_args.text_column_name
    files = {"train": data_args.train_file, "validation": data_args.validation_file}
    for name, split in (("train", train), ("validation", validation)):
        if split is None:
            continue
        if split.column_names is not None and column not in split.column_names:
            raise InputError(
                f"`text_column_name` {column!r} is not a column of the {name} split; columns: {split.column_names}."
            )
        path = files[name] if data_args.dataset_name is None else None
        _check_text_column(split, column, f"`{name}_file` {path}" if path else f"The {name} split")
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
        for split, path in files.items():
            _check_bytes(f"`{split}_file` {path}", path, builder)
            # datasets would cast a number in a text column to a string, or fail without naming the line.
            problem = _json_problem(path, data_args.text_column_name) if builder == "json" else None
            if problem is not None:
                raise InputError(f"`{split}_file` {path}: {problem}.")
        options = {"sample_by": data_args.text_sample_by} if builder == "text" else {}
        try:
            return dict(datasets.load_dataset(builder, data_files=files, streaming=data_args.streaming, **options))
        except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException, ValueError) as error:
            cause = error.__cause__ or error
            named = " / ".join(f"`{split}_file` {path}" for split, path in files.items())
            raise InputError(f"Could not read {named}: {' '.join(str(cause).split())}") from error
    if data_args.validation_file is not None:
        raise InputError("`validation_file` needs a `train_file`.")
    corpus = datasets.Dataset.from_dict({"text": default_corpus()})
    return {"train": corpus.to_iterable_dataset() if data_args.streaming else corpus}


def _file_builder(files: dict[str, str]) -> str:
    builders = set()
    for key, path in files.items():
        suffix = Path(path).suffix.lower()
        if suffix not in FILE_BUILDERS:
            raise InputError(f"`{key}_file` {path!r} must end in one of {sorted(FILE_BUILDERS)}.")
        if Path(path).is_dir():
            raise InputError(f"`{key}_file` {path!r} is a directory, not a file.")
        if not Path(path).is_file():
            raise InputError(f"`{key}_file` {path!r} does not exist.")
        builders.add(FILE_BUILDERS[suffix])
    if len(builders) != 1:
        raise InputError(f"`train_file` and `validation_file` must have the same format, got {sorted(builders)}.")
    return builders.pop()


def _check_bytes(name: str, path: str, builder: str) -> None:
    """Reject an empty file, a Parquet file without Parquet's magic bytes, and text that is not UTF-8 or has NULs.

    One pass over the bytes in 1 MiB chunks (``name`` is how the message names the file).
    """
    if builder == "parquet":
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(max(Path(path).stat().st_size - 4, 0))
            tail = handle.read(4)
        if not head:
            raise InputError(f"{name} is empty.")
        if head != b"PAR1" or tail != b"PAR1":
            raise InputError(f"{name} is not a Parquet file (no PAR1 magic bytes): a corrupt or mislabelled file?")
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, blank = 1, True
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            nul = chunk.find(b"\0")
            if nul >= 0:
                line += chunk.count(b"\n", 0, nul)
                raise InputError(f"{name} is binary, not text: a NUL byte on line {line}.")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                start = max(error.start - len(error.object) + len(chunk), 0)  # the decoder may prepend held bytes
                line += chunk.count(b"\n", 0, start)
                raise InputError(
                    f"{name} is not UTF-8 text: byte {chunk[start]:#04x} on line {line} (binary, or another encoding: "
                    "convert it, e.g. with `iconv -t utf-8`)."
                ) from error
            line += chunk.count(b"\n")
            blank = blank and not chunk.strip()
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise InputError(f"{name} is not UTF-8 text: it ends inside a multi-byte character.") from error
    if blank:
        raise InputError(f"{name} is empty.")


def _json_problem(path: str, column: str) -> str | None:
    """The first record of a JSON Lines file that is not an object with a string ``column``, described.

    A ``.json`` file whose first line is not a JSON value on its own is read as one JSON document (an array of
    objects), as `datasets` does. ``None`` when every record is fine.
    """
    with open(path, encoding="utf-8") as handle:
        lines = [(number, line) for number, line in enumerate(handle, 1) if line.strip()]
    records: list[tuple[str, Any]] = []
    for number, line in lines:
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            if number != lines[0][0] or not path.lower().endswith(".json"):
                return f"line {number} is not valid JSON ({error.msg}, column {error.colno})"
            return _json_document_problem(path, column)
    return _records_problem(records, column)


def _json_document_problem(path: str, column: str) -> str | None:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        return f"line {error.lineno} is not valid JSON ({error.msg}, column {error.colno})"
    if not isinstance(document, list):
        return f"the JSON document is a {type(document).__name__}; give an array of objects or JSON Lines"
    return _records_problem([(f"record {index}", record) for index, record in enumerate(document)], column)


def _records_problem(records: list[tuple[str, Any]], column: str) -> str | None:
    for where, record in records:
        if not isinstance(record, dict):
            return f"{where} is a JSON {type(record).__name__}, not an object"
        if column not in record:
            return f"{where} has no {column!r} key (the `text_column_name`)"
        if not isinstance(record[column], str):
            value = record[column]
            return f"{where}: {column!r} is {value!r} ({type(value).__name__}), not a string"
    return None


def _check_text_column(dataset: AnyDataset, column: str, source: str) -> None:
    """Every document must be a string: a number or a missing value would fail later, inside tokenisation.

    Cheap: the column's type and Arrow null count (a stream's type only, when its source declares one).
    """
    feature = None if dataset.features is None else dataset.features[column]
    if feature is not None and not (isinstance(feature, datasets.Value) and feature.dtype in _STRING_TYPES):
        kind = getattr(feature, "dtype", type(feature).__name__)
        raise InputError(f"{source}: column {column!r} holds {kind} values, not strings.")
    if isinstance(dataset, datasets.Dataset):
        if len(dataset) == 0:
            raise InputError(f"{source} holds no documents.")
        missing = dataset.data.column(column).null_count
        if missing:
            raise InputError(f"{source}: column {column!r} has {missing} missing values.")


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
