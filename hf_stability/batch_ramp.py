"""Batch-size ramp (GPT-3's gradual batch-size increase) for `StabilityTrainer`.

The global batch starts at ``batch_ramp_start`` samples and grows by ``batch_ramp_increment`` until it
reaches the target ``per_device_train_batch_size × gradient_accumulation_steps × world_size``, spread
evenly over ``batch_ramp_length`` samples (or steps), as Megatron-LM's ``--rampup-batch-size start
increment samples`` does. The batch always grows in whole micro-batches: every rank runs
``k ≤ gradient_accumulation_steps`` micro-batches of ``per_device_train_batch_size`` samples per step.

How it meets `Trainer`: Trainer still sees ``gradient_accumulation_steps`` dataloader items per optimizer
step, but during the ramp the first ``gradient_accumulation_steps - k`` of them are empty placeholders that
run no forward or backward (the real micro-batches come last, so the last one still triggers DDP's
gradient all-reduce). Hence ``global_step``, the LR schedule (it follows **steps**), logging and
checkpoint steps stay Trainer's own. The loss is normalised over the real micro-batches only: by the
number of label tokens they hold (``num_items_in_batch``) when the model takes it, else by ``k``.

Data: the samples form one continuous stream, pass after pass over the dataset (each pass shuffled with
the run's seed, or in order with ``train_sampling_strategy="sequential"``), and step ``t`` takes the next
global batch of samples, every rank its own contiguous micro-batches. Which samples a step gets is a
pure function of the step number, so a resumed run continues the ramp and the stream exactly where they
stopped (nothing to checkpoint), with or without ``ignore_data_skip`` (skipping is free here: the sampler
starts at the resumed step itself when Trainer will not skip the epoch's trained batches). Only the
``"random"`` and ``"sequential"`` `train_sampling_strategy` fit one stream; the others (length grouping)
are refused at construction rather than silently replaced. A Trainer epoch is ``len(dataset) // target``
steps (a pass at the target batch); during the ramp the stream runs behind that count, it never skips or
repeats a sample of a pass.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.data import DataLoader, Dataset

from hf_stability import metric_names as names
from hf_stability._compat import collator_with_removed_columns, num_items_in_batch, remove_unused_columns
from hf_stability.settings import BatchRampSettings, RampUnit


@dataclass(frozen=True)
class BatchRamp:
    """The global batch size of every optimizer step, Megatron-LM style.

    ``at(step)[1]`` (``step`` 0-based) is ``start + n·increment`` capped at ``target``, where ``n`` counts the
    ``length / ((target - start) / increment)`` samples (or steps) consumed so far.
    """

    start: int
    increment: int
    length: int
    target: int
    unit: RampUnit | str = RampUnit.SAMPLES

    def __post_init__(self) -> None:
        if not isinstance(self.unit, RampUnit):  # built by hand; from the settings it was checked when set
            object.__setattr__(self, "unit", RampUnit.checked("batch_ramp_unit", self.unit))
        if not 0 < self.start < self.target:
            raise ValueError(f"`batch_ramp_start` must be in (0, target={self.target}), got {self.start}.")
        if self.increment < 1 or (self.target - self.start) % self.increment:
            raise ValueError(
                f"`batch_ramp_increment` ({self.increment}) must be >= 1 and divide target - start "
                f"({self.target} - {self.start})."
            )
        if self.length < 1:
            raise ValueError(f"`batch_ramp_length` must be >= 1, got {self.length}.")

    @functools.cached_property
    def _ramp_phase(self) -> list[tuple[int, int]]:
        """``(samples consumed before the step, global batch)`` of every step before the target is reached."""
        per_increment = self.length / ((self.target - self.start) // self.increment)
        phase: list[tuple[int, int]] = []
        consumed = 0
        while True:
            position = consumed if self.unit == RampUnit.SAMPLES else len(phase)
            size = min(self.start + int(position // per_increment) * self.increment, self.target)
            if size == self.target:
                return phase
            phase.append((consumed, size))
            consumed += size

    def at(self, step: int) -> tuple[int, int]:
        """``(samples consumed before step, global batch of step)``, ``step`` counted from 0."""
        phase = self._ramp_phase
        if step < len(phase):
            return phase[step]
        end = phase[-1][0] + phase[-1][1] if phase else 0
        return end + (step - len(phase)) * self.target, self.target


class RampBatchSampler:
    """Yields the micro-batches (lists of dataset indices) of each optimizer step, for all ranks.

    Per step: ``accumulation × world_size`` items, slot by slot and rank by rank inside a slot, so that
    accelerate's `BatchSamplerShard` (which deals item ``i`` to rank ``i % world_size``) gives every rank
    its ``accumulation`` items in order. Placeholders (empty lists) fill the first slots during the ramp.
    ``current_step`` tells the step a new epoch iterator starts from (Trainer's ``global_step``): with
    Trainer's epochs of ``steps_per_epoch`` steps, that fixes the epoch, also in a resumed run. Trainer skips the
    batches a resumed epoch already trained, so an iterator starts at the epoch's first step; with
    ``ignore_data_skip`` Trainer skips nothing, so it starts at ``current_step`` itself (else the ramp and the
    stream would restart from the epoch's start while ``global_step`` goes on). With ``kept`` (a tensor of dataset
    indices) the stream runs over those samples only.
    """

    drop_last = True  # every step is complete: BatchSamplerShard must not pad or cycle

    def __init__(self, ramp: BatchRamp, num_samples: int, micro_batch: int, accumulation: int, world_size: int,
                 shuffle: bool, seed: int, current_step: Callable[[], int], ignore_data_skip: bool = False,
                 kept: torch.Tensor | None = None) -> None:
        self.kept = kept  # the dataset indices the stream runs over (`exclude_samples`); None: all num_samples
        num_samples = len(kept) if kept is not None else num_samples
        self.ramp, self.num_samples, self.micro_batch = ramp, num_samples, micro_batch
        self.accumulation, self.world_size = accumulation, world_size
        self.shuffle, self.seed, self.current_step = shuffle, seed, current_step
        self.ignore_data_skip = ignore_data_skip
        self.steps_per_epoch = num_samples // ramp.target
        if self.steps_per_epoch < 1:
            raise ValueError(f"`train_dataset` has {num_samples} samples, fewer than one target batch ({ramp.target}).")

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulation * self.world_size

    def _stream(self, start: int, count: int) -> list[int]:
        """Samples ``start .. start + count - 1`` of the stream of passes over the dataset."""
        indices: list[int] = []
        while count > 0:
            data_pass, offset = divmod(start, self.num_samples)
            if self.shuffle:
                order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + data_pass))
            else:
                order = torch.arange(self.num_samples)
            if self.kept is not None:
                order = self.kept[order]
            taken = order[offset : offset + count].tolist()
            indices += taken
            start, count = start + len(taken), count - len(taken)
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        step = self.current_step()
        first = step if self.ignore_data_skip else step // self.steps_per_epoch * self.steps_per_epoch
        for step in range(first, first + self.steps_per_epoch):
            consumed, size = self.ramp.at(step)
            samples = self._stream(consumed, size)
            real = size // (self.micro_batch * self.world_size)
            for slot in range(self.accumulation):
                for rank in range(self.world_size):
                    j = slot - (self.accumulation - real)
                    if j < 0:
                        yield []
                    else:
                        begin = (j * self.world_size + rank) * self.micro_batch
                        yield samples[begin : begin + self.micro_batch]


class RampCollator:
    """Collates real micro-batches with the wrapped collator; a placeholder (no features) becomes ``{}``."""

    def __init__(self, collator: Callable[[list], dict]) -> None:
        self.collator = collator

    def __call__(self, features: list) -> dict[str, Any]:
        return self.collator(features) if features else {}


if TYPE_CHECKING:  # the mixin is only ever mixed into a Trainer, whose attributes it uses
    from transformers import Trainer as _MixedInto
else:
    _MixedInto = object


class BatchRampMixin(_MixedInto):
    """The `Trainer` overrides behind the batch ramp; inactive (plain Trainer behaviour) without a ramp.

    transformers internals relied on (`hf_stability._compat`, ``TRAINER_HOOKS`` and ``TRAINER_HELPERS``, checked
    when `StabilityTrainer` is built): the epoch loop fetches ``gradient_accumulation_steps`` items per step
    through ``get_batch_samples``, sets ``current_gradient_accumulation_steps = len(batch_samples)`` (the loss
    divisor when the loss is not normalised by ``num_items_in_batch``), runs all but the last item under
    ``no_sync`` and calls ``training_step`` per item.
    """

    batch_ramp: BatchRamp | None = None
    _ramp_micro_batches = 0
    excluded_samples: frozenset[int] = frozenset()  # set by `hf_stability.exclude.ExcludeSamplesMixin`

    def _build_batch_ramp(self) -> None:
        args = self.args
        ramp = BatchRampSettings.resolve({}, args)  # a plain TrainingArguments gets start 0: no ramp
        if not ramp.batch_ramp_start:
            return
        if args.train_sampling_strategy not in ("random", "sequential"):
            raise ValueError(
                f"`train_sampling_strategy={args.train_sampling_strategy!r}` cannot be combined with the batch ramp "
                "(`batch_ramp_start`), whose steps take one stream of samples: use 'random' or 'sequential'."
            )
        micro, world = args.per_device_train_batch_size, args.world_size
        target = micro * args.gradient_accumulation_steps * world
        for name in ("batch_ramp_start", "batch_ramp_increment"):
            if getattr(ramp, name) % (micro * world):
                raise ValueError(
                    f"`{name}` ({getattr(ramp, name)}) must be a multiple of per_device_train_batch_size x "
                    f"world size ({micro} x {world}): the batch grows in whole micro-batches."
                )
        self.batch_ramp = BatchRamp(ramp.batch_ramp_start, ramp.batch_ramp_increment, ramp.batch_ramp_length, target,
                                    ramp.batch_ramp_unit)

    def get_train_dataloader(self) -> DataLoader:
        if self.batch_ramp is None:
            return super().get_train_dataloader()
        # `datasets` is an extra: a `datasets.Dataset` exists only once its module has been imported.
        datasets = sys.modules.get("datasets")

        dataset, collator = self.train_dataset, self.data_collator
        if not isinstance(dataset, Sized) or isinstance(dataset, torch.utils.data.IterableDataset):
            raise TypeError("`train_dataset` must be a map-style dataset with a length for the batch ramp.")
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = remove_unused_columns(self, dataset)
        else:
            collator = collator_with_removed_columns(self, collator)
        kept = None
        if self.excluded_samples:
            keep = torch.ones(len(dataset), dtype=torch.bool)
            keep[[index for index in self.excluded_samples if index < len(dataset)]] = False
            kept = keep.nonzero().squeeze(1)
        sampler = RampBatchSampler(
            self.batch_ramp, len(dataset), self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps,
            self.args.world_size, shuffle=self.args.train_sampling_strategy != "sequential",
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            current_step=lambda: self.state.global_step, ignore_data_skip=self.args.ignore_data_skip, kept=kept,
        )
        # A `datasets.Dataset` is map-style (len, getitem): all DataLoader needs, as in Trainer's own loader.
        loader = DataLoader(cast("Dataset[Any]", dataset), batch_sampler=sampler, collate_fn=RampCollator(collator),
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.batch_ramp is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        real = [batch for batch in batch_samples if batch]
        self._ramp_micro_batches = len(real)
        return batch_samples, num_items_in_batch(self, real, device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.batch_ramp is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if not inputs:  # a placeholder slot of the ramp: no forward, no backward
            return torch.zeros((), device=self.args.device)
        self.current_gradient_accumulation_steps = self._ramp_micro_batches
        return super().training_step(model, inputs, num_items_in_batch)

    def batch_ramp_metrics(self) -> dict[str, float]:
        """``stability/global_batch_size`` of the step just completed, and the samples consumed so far."""
        if self.batch_ramp is None or self.state.global_step < 1:
            return {}
        consumed, size = self.batch_ramp.at(self.state.global_step - 1)
        return {names.GLOBAL_BATCH_SIZE: size, names.CONSUMED_SAMPLES: consumed + size}

