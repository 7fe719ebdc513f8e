"""The exclude list: leave the samples a run found bad out of the next run or resume.

``StabilityConfig.exclude_samples`` names a bad-samples file (``{"<index>": [event, ...]}``, the shape of the
``stability_bad_samples.json`` a run writes) or ``"auto"``, the output directory's own file when it exists (so a
resume in the same directory leaves out what the earlier run found). `StabilityTrainer` reads it each time it
builds the train dataloader and leaves those samples out:

- a map-style dataset: Trainer's sampler (random, sequential, ``group_by_length``) is wrapped in
  `ExcludeSamplesSampler`, which drops the listed dataset indices and counts them out of its length, so epochs
  and ``max_steps`` from ``num_train_epochs`` shrink accordingly. The kept samples come in the order the run
  would have fed them without the list (a random order stays the same seeded permutation, minus the samples);
- the batch ramp (`hf_stability.batch_ramp`): its stream runs over the kept indices;
- an `IterableDataset`: `ExcludeStreamPositions` skips the listed positions of each pass over the stream
  (0-based, counted before the stream is split between ranks): the indices there are stream positions.

A plain `Trainer` gets the same through `excluding_sampler` in its train-sampler hook (docs/doctor.md).
The count goes to the log, and ``stability_excluded_samples.json`` in the output directory records what was left
out for ``hf-stability report`` and the model card.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate.data_loader import SeedableRandomSampler
from torch.utils.data import IterableDataset, RandomSampler, Sampler

from hf_stability._compat import output_dir
from hf_stability._logging import get_logger
from hf_stability.events import BAD_SAMPLES_FILENAME
from hf_stability.report import EXCLUDED_FILENAME
from hf_stability.settings import EXCLUDE_AUTO, ExcludeSettings

logger = get_logger(__name__)


def exclude_list_file(setting: str, directory: str | os.PathLike) -> Path | None:
    """The file ``exclude_samples`` names: the path itself, or for ``"auto"`` the output directory's bad-samples
    file; ``None`` when the setting is empty."""
    if not setting:
        return None
    return Path(directory) / BAD_SAMPLES_FILENAME if setting == EXCLUDE_AUTO else Path(setting)


def read_exclude_list(setting: str, directory: str | os.PathLike) -> frozenset[int]:
    """The sample indices ``exclude_samples`` lists (``directory`` is the run's output directory, for ``"auto"``).

    ``"auto"`` without the file excludes nothing; a named file that is missing or not a bad-samples file is a
    one-line `ValueError` naming the setting and the file.
    """
    from hf_stability.doctor import read_bad_samples_file

    path = exclude_list_file(setting, directory)
    if path is None or (setting == EXCLUDE_AUTO and not path.exists()):
        return frozenset()
    if not path.is_file():
        raise ValueError(f"`exclude_samples`: {str(path)!r} is not a file (give a bad-samples JSON file or 'auto').")
    try:
        return frozenset(read_bad_samples_file(path))
    except (OSError, ValueError) as error:
        raise ValueError(f"`exclude_samples`: {error}") from None


class ExcludeSamplesSampler(Sampler[int]):
    """``sampler`` without the ``excluded`` indices; its length counts them out.

    ``sampler`` yields each index of ``range(len(sampler))`` once per pass, as Trainer's random, sequential and
    length-grouped samplers do; ``set_epoch`` reaches it (accelerate's seeded shuffling per epoch).
    """

    def __init__(self, sampler: Sampler[int], excluded: Collection[int]) -> None:
        if not isinstance(sampler, Sized):
            raise TypeError("`sampler` must have a length (one pass over a map-style dataset).")
        self.sampler, self.excluded = sampler, frozenset(excluded)
        self._kept = len(sampler) - sum(1 for index in self.excluded if 0 <= index < len(sampler))

    def __iter__(self) -> Iterator[int]:
        return (index for index in self.sampler if index not in self.excluded)

    def __len__(self) -> int:
        return self._kept

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def excluding_sampler(sampler: Sampler[int] | None, excluded: Collection[int], args: Any) -> Sampler[int] | None:
    """Trainer's train sampler ``sampler`` without the ``excluded`` dataset indices (``args``: the run's
    `TrainingArguments`); ``sampler`` itself when nothing is excluded.

    A `RandomSampler` first becomes accelerate's `SeedableRandomSampler`, seeded as accelerate seeds it
    (``data_seed``, else ``seed``): accelerate swaps only a `RandomSampler` it sees, not one inside the wrapper, and
    the seeded permutation keeps the order of the run without the list and a resumed epoch's order.
    """
    if sampler is None or not excluded:
        return sampler
    if type(sampler) is RandomSampler and args.accelerator_config.use_seedable_sampler:
        seed = args.data_seed if args.data_seed is not None else args.seed
        sampler = SeedableRandomSampler(sampler.data_source, data_seed=seed)
    return ExcludeSamplesSampler(sampler, excluded)


class ExcludeStreamPositions(IterableDataset):
    """``dataset`` (an `IterableDataset`) without the items at the ``excluded`` positions of each pass (0-based)."""

    def __init__(self, dataset: IterableDataset, excluded: Collection[int]) -> None:
        self.dataset, self.excluded = dataset, frozenset(excluded)

    def __iter__(self) -> Iterator[Any]:
        return (item for position, item in enumerate(self.dataset) if position not in self.excluded)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


if TYPE_CHECKING:  # the mixin is only ever mixed into a Trainer, whose attributes it uses
    from transformers import Trainer as _MixedInto
else:
    _MixedInto = object


class ExcludeSamplesMixin(_MixedInto):
    """The `Trainer` overrides behind ``exclude_samples``; inactive (plain Trainer behaviour) without a list.

    transformers internals relied on (`hf_stability._compat.TRAINER_DATA_HOOKS`, checked when `StabilityTrainer`
    is built): ``get_train_dataloader`` takes the sampler of a map-style train dataset from ``_get_train_sampler``.
    """

    excluded_samples: frozenset[int] = frozenset()

    def get_train_dataloader(self) -> Any:
        self.excluded_samples = self._read_excluded_samples()
        dataset = self.train_dataset
        if not self.excluded_samples or not isinstance(dataset, IterableDataset):
            return super().get_train_dataloader()
        # Trainer's own loader (collator, workers, accelerate's split between ranks) over the filtered stream.
        self.train_dataset = ExcludeStreamPositions(dataset, self.excluded_samples)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset = dataset

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        return excluding_sampler(super()._get_train_sampler(train_dataset), self.excluded_samples, self.args)

    def _read_excluded_samples(self) -> frozenset[int]:
        """The list ``exclude_samples`` names, read now (on a resume, ``"auto"`` finds the earlier run's file); the
        count is logged and recorded in `EXCLUDED_FILENAME` (main process)."""
        setting = ExcludeSettings.resolve({}, self.args).exclude_samples  # a plain TrainingArguments: empty
        directory = output_dir(self.args)
        record = Path(directory) / EXCLUDED_FILENAME
        if not setting:
            if self.is_world_process_zero() and record.is_file():
                record.unlink()  # an earlier run's record: this run leaves nothing out
            return frozenset()
        path = exclude_list_file(setting, directory)
        excluded = read_exclude_list(setting, directory)
        stream = isinstance(self.train_dataset, IterableDataset)
        kind = "stream positions" if stream else "dataset indices"
        if setting == EXCLUDE_AUTO and not excluded:
            logger.info("exclude_samples='auto': no samples listed in %s yet; nothing is excluded.", path)
        else:
            size = None if stream or not isinstance(self.train_dataset, Sized) else len(self.train_dataset)
            outside = 0 if size is None else sum(1 for index in excluded if index >= size)
            beyond = f" ({outside} of them beyond the dataset's {size} rows)" if outside else ""
            logger.info("Excluding %d sample(s) (%s) listed in %s from training%s.", len(excluded), kind, path,
                        beyond)
        if self.is_world_process_zero():
            Path(directory).mkdir(parents=True, exist_ok=True)
            index_kind = "stream_position" if stream else "dataset_index"
            content = {"exclude_samples": setting, "file": str(path), "index_kind": index_kind,
                       "samples": sorted(excluded)}
            record.write_text(json.dumps(content, indent=1), encoding="utf-8")
        return excluded

