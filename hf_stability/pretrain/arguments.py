"""Recipe arguments: data, model and tokenizer dataclasses, and a parser where YAML sets defaults.

Precedence, lowest first: dataclass defaults < the recipe's own defaults < ``--config x.yaml`` <
command-line flags. A YAML key that no dataclass knows is an error, so a typo cannot be silently ignored; for
the same reason flags are never abbreviated (``--max_step`` is not ``--max_steps``, on the command line as in
YAML). Every problem is an `InputError` with a one-line message, which the recipes print without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser, TrainingArguments

from hf_stability._compat import parser_destinations
from hf_stability.config import StabilityConfig
from hf_stability.pretrain.errors import InputError, input_errors

TEXT_SAMPLE_BY = ("line", "paragraph", "document")


@dataclass
class DataArguments:
    """Where the pre-training text comes from and how it is cut into training rows."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` dataset name or local dataset directory (`load_dataset(name)`)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration of `dataset_name` (e.g. 'wikitext-103-raw-v1')."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "A local training file: .txt/.text, .json/.jsonl or .parquet."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "A local validation file, same formats as `train_file`."}
    )
    text_column_name: str = field(default="text", metadata={"help": "The column holding each document's text."})
    text_sample_by: str = field(
        default="paragraph",
        metadata={
            "help": "For .txt files: one document per line, per blank-line separated paragraph, or per file.",
            "choices": list(TEXT_SAMPLE_BY),
        },
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={
            "help": "Without a validation split, hold out documents whose index modulo 100 is below this number "
            "(works for streamed data too). 0 disables evaluation."
        },
    )
    max_seq_length: int = field(default=128, metadata={"help": "Length of a model input row, special tokens included."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first this many training rows (after packing)."}
    )
    max_eval_samples: int | None = field(
        default=256, metadata={"help": "Keep only the first this many evaluation rows (after packing)."}
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset instead of downloading/preparing it (needs `max_steps`)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenisation with `datasets.map` (not used when streaming)."}
    )

    def __post_init__(self) -> None:
        if self.dataset_name is not None and self.train_file is not None:
            raise ValueError("Give either `dataset_name` or `train_file`, not both.")
        if self.text_sample_by not in TEXT_SAMPLE_BY:
            raise ValueError(f"`text_sample_by` must be one of {TEXT_SAMPLE_BY}, got {self.text_sample_by!r}.")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"`validation_split_percentage` must be in [0, 100), got {self.validation_split_percentage}."
            )
        if self.max_seq_length < 8:
            raise ValueError(f"`max_seq_length` must be >= 8, got {self.max_seq_length}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 or unset, got {value}.")


@dataclass
class ModelArguments:
    """Which model and tokenizer to start from; by default a tiny model and a tokenizer trained on the data."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue pre-training these weights (a local directory or Hub id)."}
    )
    model_config_name: str | None = field(
        default=None, metadata={"help": "Train from scratch with this config (name or path) instead of the tiny one."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Override config attributes when training from scratch, e.g. 'd_model=128,encoder_layers=4'."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained tokenizer (name or path). Without it (and without `model_name_or_path`), one is "
            "trained on the training text and saved with the run."
        },
    )
    tokenizer_vocab_size: int = field(
        default=2000, metadata={"help": "Vocabulary size of a tokenizer trained on the fly."}
    )

    def __post_init__(self) -> None:
        if self.model_name_or_path is not None and self.model_config_name is not None:
            raise ValueError("Give either `model_name_or_path` or `model_config_name`, not both.")
        if self.config_overrides is not None and self.model_name_or_path is not None:
            raise ValueError("`config_overrides` applies to training from scratch; drop `model_name_or_path`.")
        if self.tokenizer_vocab_size < 300:
            raise ValueError(f"`tokenizer_vocab_size` must be >= 300, got {self.tokenizer_vocab_size}.")


class RecipeArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose errors are `InputError` (one line) instead of argparse's usage dump and exit.

    With `TrainingArguments` the usage text runs to hundreds of lines and buries the one that matters.
    """

    def error(self, message: str) -> NoReturn:
        raise InputError(message)


def make_parser(objective_arguments: type | None = None) -> HfArgumentParser:
    """`HfArgumentParser` over data, model, (objective) and `StabilityConfig` arguments, plus ``--config``."""
    classes: list[Any] = [DataArguments, ModelArguments]  # HfArgumentParser types them as NewType(Any)
    if objective_arguments is not None:
        classes.append(objective_arguments)
    classes.append(StabilityConfig)
    parser = RecipeArgumentParser(classes, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="A YAML file of argument defaults; command-line flags win.")
    return parser


def parse_args(
    parser: HfArgumentParser,
    argv: Sequence[str] | None = None,
    recipe_defaults: Mapping[str, Any] | None = None,
) -> tuple[Any, ...]:
    """Parse ``argv`` into the parser's dataclasses, applying recipe defaults and ``--config`` first.

    Returns one instance per dataclass, in the parser's order. Raises `InputError` (a ``ValueError``) for a
    key of the YAML file (or of ``recipe_defaults``) that is not an argument, an unreadable YAML file, a flag
    argparse rejects, a value a dataclass rejects, and a ``max_steps`` that cannot train (see
    `check_max_steps`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    known = parser_destinations(parser) - {"help", "config"}
    for source, values in (("recipe defaults", recipe_defaults or {}), *_config_file(parser, argv)):
        unknown = sorted(str(key) for key in set(values) - known)
        if unknown:
            raise InputError(f"Unknown argument(s) in {source}: {', '.join(unknown)}.")
        parser.set_defaults(**values)
    with input_errors():  # a dataclass's own validation (`__post_init__`)
        # With ``--config`` declared outside the dataclasses, the parser also returns a Namespace holding it.
        *instances, leftover = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if leftover:
        raise InputError(f"Unknown command-line argument(s): {' '.join(leftover)}.")
    instances = [instance for instance in instances if not isinstance(instance, argparse.Namespace)]
    for instance in instances:
        if isinstance(instance, TrainingArguments):
            check_max_steps(instance.max_steps)
    return tuple(instances)


def check_max_steps(max_steps: int) -> None:
    """Accept ``max_steps`` > 0, or -1 (`TrainingArguments`' default: train for ``num_train_epochs``).

    `Trainer` turns 0 into a silent one-step run and treats any negative value as "use epochs"; an explicit
    0 or a value below -1 is almost certainly a typo, so it is an error rather than a run that trains nothing.
    """
    if max_steps == 0 or max_steps < -1:
        raise InputError(f"`max_steps` must be > 0, or -1 to train for `num_train_epochs` instead, got {max_steps}.")


def _config_file(parser: HfArgumentParser, argv: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The ``--config`` YAML as ``[(path, mapping)]``, or ``[]`` without one."""
    path = parser.parse_known_args(argv)[0].config
    if path is None:
        return []
    if os.path.isdir(path):
        raise InputError(f"`--config` {path} is a directory, not a YAML file.")
    if not os.path.isfile(path):
        raise InputError(f"`--config` file not found: {path}")
    raw = Path(path).read_bytes()
    try:
        values = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise InputError(
            f"`--config` {path} is not UTF-8 text: byte {raw[error.start]:#04x} on line {line}."
        ) from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" on line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        cause = getattr(error, "problem", None) or str(error)
        raise InputError(f"`--config` {path} is not valid YAML{where}: {cause}.") from error
    if values is None:  # an empty file (or only comments) sets nothing
        return []
    if not isinstance(values, dict):
        raise InputError(
            f"`--config` {path} must hold a mapping of argument names to values, got a {type(values).__name__}."
        )
    return [(path, values)]
