"""``hf-stability report OUTPUT_DIR --bad-samples``: the samples a run's events named, with their text when at hand.

The samples come from ``stability_bad_samples.json`` (`hf_stability.doctor.read_bad_samples`). Their text needs the
rows and the tokenizer: the recipes write `DATA_FILENAME` into the output directory before training (the Arrow files
that hold their packed training rows, or a Parquet copy of the rows' ``input_ids`` when they live only in memory,
and the tokenizer), and the listing decodes each sample's ``input_ids`` from there. Without it (a run of your own
script, a streamed training set, cleaned caches) the listing says why the text is unavailable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hf_stability.doctor import read_bad_samples
from hf_stability.events import BAD_SAMPLES_FILENAME
from hf_stability.exclude import exclude_list_file
from hf_stability.report import read_excluded

DATA_FILENAME = "stability_data.json"
ROWS_COPY_FILENAME = "stability_train_rows.parquet"
# The text listing cuts each sample's text to this many characters (``--json`` has it whole).
TEXT_CHARS = 200


def write_data_reference(directory: str | os.PathLike, rows: Any, tokenizer: str) -> None:
    """Record where the training ``rows`` (a `datasets` dataset) and the ``tokenizer`` (a path or Hub name) are, so
    that the report can decode the samples by index: the rows' own Arrow cache files, else a Parquet copy of their
    ``input_ids`` (rows built in memory, e.g. the embedded corpus). A streamed set (no index) is recorded as such.

    Row ``i`` of the rows is row ``i`` of their cache files: the recipes map documents to rows and keep a prefix
    (``max_train_samples``), never reorder them (Trainer's sampler shuffles)."""
    import datasets

    directory = Path(directory)
    # Paths inside the output directory are stored relative to it (the directory may move), others absolute.
    if Path(tokenizer).resolve() == directory.resolve():
        tokenizer = "."
    elif Path(tokenizer).exists():
        tokenizer = str(Path(tokenizer).resolve())
    reference: dict[str, Any] = {"tokenizer": tokenizer, "column": "input_ids"}
    if not isinstance(rows, datasets.Dataset):
        reference["rows"] = None
        reference["unavailable"] = "the training set was streamed: its samples are stream positions, not rows"
    elif rows.cache_files:
        reference["rows"] = [entry["filename"] for entry in rows.cache_files]
    else:
        rows.select_columns(["input_ids"]).to_parquet(str(directory / ROWS_COPY_FILENAME))
        reference["rows"] = [ROWS_COPY_FILENAME]
    (directory / DATA_FILENAME).write_text(json.dumps(reference, indent=1), encoding="utf-8")


def sample_texts(directory: str | os.PathLike, indices: list[int]) -> tuple[dict[int, str], str | None]:
    """The decoded text of each of ``indices`` and ``None``, or ``{}`` and why the text is unavailable."""
    path = Path(directory) / DATA_FILENAME
    if not path.is_file():
        return {}, f"no {DATA_FILENAME} in the output directory (the recipes write it; a script of your own does not)"
    try:
        reference = json.loads(path.read_text(encoding="utf-8"))
        if reference.get("rows") is None:
            return {}, str(reference.get("unavailable", "the run recorded no rows"))
        import datasets
        from pyarrow import parquet
        from transformers import AutoTokenizer

        files = [str(Path(directory) / name) for name in reference["rows"]]  # an absolute name stays itself
        parts = [datasets.Dataset(parquet.read_table(name)) if name.endswith(".parquet")
                 else datasets.Dataset.from_file(name) for name in files]
        rows = datasets.concatenate_datasets(parts)
        local = Path(directory) / reference["tokenizer"]
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else reference["tokenizer"])
        column = reference["column"]
        return {index: str(tokenizer.decode(rows[index][column])) for index in indices if index < len(rows)}, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return {}, f"the rows or tokenizer named in {DATA_FILENAME} could not be read ({type(error).__name__}: {error})"


def bad_samples_listing(directory: str | os.PathLike) -> dict[str, Any]:
    """The run's bad samples by index (each with the events that named it and its text), the exclusion the run ran
    with, and the command that leaves the samples out. Raises a one-line `ValueError` on a damaged file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"`output_dir` {str(directory)!r} is not a directory.")
    samples = read_bad_samples(directory)
    texts, unavailable = sample_texts(directory, sorted(samples)) if samples else ({}, None)
    excluded = read_excluded(directory)
    bad_file = exclude_list_file("auto", directory)
    return {
        "output_dir": str(directory),
        "file": str(bad_file),
        "samples": [{"index": index, "events": samples[index], "text": texts.get(index)} for index in sorted(samples)],
        "text_unavailable": unavailable,
        "excluded": excluded,
        "exclude_with": f"--exclude_samples {bad_file}" if samples else None,
    }


def format_bad_samples(listing: dict[str, Any]) -> str:
    """The listing as text: one line per event (step, rank, micro-batch, event, loss), the text under each sample."""
    lines = [f"Bad samples of {listing['output_dir']}:"]
    excluded = listing["excluded"]
    if excluded and excluded.get("samples"):
        lines.append(f"  this run left out {len(excluded['samples'])} sample(s) ({excluded.get('index_kind')}) "
                     f"listed in {excluded.get('file')}")
    if not listing["samples"]:
        lines.append(f"  none: no event named a sample ({BAD_SAMPLES_FILENAME} absent or empty).")
        return "\n".join(lines)
    if listing["text_unavailable"]:
        lines.append(f"  text unavailable: {listing['text_unavailable']}")
    for sample in listing["samples"]:
        kinds = {event.get("index_kind", "dataset_index") for event in sample["events"]}
        label = "stream position" if kinds == {"stream_position"} else "sample"
        lines.append(f"  {label} {sample['index']}:")
        for event in sample["events"]:
            where = [f"step {event['step']}", f"rank {event.get('rank', '?')}"]
            if "micro_batch" in event:
                where.append(f"micro-batch {event['micro_batch']}")
            loss = f", loss {event['loss']}" if "loss" in event else ""
            lines.append(f"    {', '.join(where)}: {event.get('event', '?')}{loss}")
        if sample["text"] is not None:
            text = sample["text"]
            lines.append(f"    text: {text[:TEXT_CHARS]!r}" + (" ..." if len(text) > TEXT_CHARS else ""))
    lines.append(f"  leave them out of a rerun: {listing['exclude_with']}; of a resume in this output directory: "
                 "--exclude_samples auto")
    return "\n".join(lines)
