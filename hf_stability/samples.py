"""Bad-batch forensics: which samples were in the batches a stability event is about.

`StabilityTrainer`'s train dataloader tags every item with its dataset index (`TaggedDataset`) — or, for an
`IterableDataset`, its position in the stream of the pass (`TaggedIterable`) — under `SAMPLE_INDEX_KEY`, and
`TaggingCollator` moves the tags out of the features before the user's collator runs and back into the batch
as one int64 tensor. The trainer's ``training_step`` wrapper pops that tensor before the model sees the inputs
and adds it to a `SampleRecord`: per optimizer step and micro-batch, the index tensor (left on the device it
was sent to: no host read on ordinary steps), the micro-batch loss Trainer returned and, for per-sample losses,
a reference to the micro-batch inputs. The indices are exact by construction: they travel inside the batch,
whatever the sampler, resume skipping, batch ramp or data sharding did.

Only when an event fires (`event_samples`, called on every rank, since every rank decides alike) are the
indices read to the host (one read per rank), per-sample losses recomputed and every rank's part gathered.
The stability callbacks reach the record through `StepSignals.samples`; this module imports none of them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset

from hf_stability.events import BAD_SAMPLES_FILENAME

SAMPLE_INDEX_KEY = "hf_stability_sample_index"  # reserved feature/batch key carrying the tags
DATASET_INDEX = "dataset_index"  # a map-style dataset: the index ``dataset[i]`` was read with
STREAM_POSITION = "stream_position"  # an IterableDataset: the item's position (from 0) in the pass it came from
WORST_SAMPLES = 8  # per-sample losses named in an event (non-finite first, then the largest)
LISTED_STEPS = 32  # steps between the restored snapshot and the spike listed in a rollback event (nearest first)


def _tag(item: Any, tag: int) -> Any:
    """``item`` with ``tag`` under `SAMPLE_INDEX_KEY`; an item that is no mapping cannot carry it (left as is)."""
    return {**item, SAMPLE_INDEX_KEY: tag} if isinstance(item, Mapping) else item


class TaggedDataset(Dataset):
    """A map-style dataset whose items also carry the index they were read with (``__getitems__`` kept)."""

    index_kind = DATASET_INDEX

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return _tag(self.dataset[index], index)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """One batched read when the inner dataset has one (a `datasets.Dataset`), as DataLoader would do."""
        batched = getattr(self.dataset, "__getitems__", None)
        items = batched(indices) if batched is not None else [self.dataset[index] for index in indices]
        return [_tag(item, index) for item, index in zip(items, indices, strict=True)]


class TaggedIterable(IterableDataset):
    """An iterable dataset whose items also carry their position in the pass (counted as they are yielded).

    With ``dataloader_num_workers > 0`` each worker counts the stream it iterates itself.
    """

    index_kind = STREAM_POSITION

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[Any]:
        for position, item in enumerate(self.dataset):
            yield _tag(item, position)

    def set_epoch(self, epoch: int) -> None:
        """Passed on: Trainer and accelerate reshuffle a `datasets.IterableDataset` per epoch through it."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def tagged(dataset: Any) -> TaggedDataset | TaggedIterable:
    """``dataset`` with every item tagged (its dataset index, or its stream position for an `IterableDataset`)."""
    return TaggedIterable(dataset) if isinstance(dataset, IterableDataset) else TaggedDataset(dataset)


class TaggingCollator:
    """Takes the tags out of the features, collates them with ``collator``, puts them back as an int64 tensor.

    The tensor travels like the other batch tensors (device placement, accelerate's batch dispatch across ranks).
    """

    def __init__(self, collator: Callable[[list], Any]) -> None:
        self.collator = collator

    def __call__(self, features: list) -> Any:
        tags, features = take_tags(features)
        return put_tags(self.collator(features), tags)


def take_tags(features: list) -> tuple[list[int | None], list]:
    """The tags of ``features`` and the features without them (taken out of the dicts `_tag` made)."""
    return [f.pop(SAMPLE_INDEX_KEY, None) if isinstance(f, MutableMapping) else None for f in features], features


def put_tags(batch: Any, tags: list[int | None]) -> Any:
    """``batch`` with ``tags`` as an int64 tensor under `SAMPLE_INDEX_KEY` (when every feature had one)."""
    if tags and None not in tags and isinstance(batch, MutableMapping):
        batch[SAMPLE_INDEX_KEY] = torch.tensor(tags, dtype=torch.int64)
    return batch


def pop_sample_indices(inputs: Any) -> torch.Tensor | None:
    """Take the tags out of a batch before the model sees it (``None`` when it carries none)."""
    return inputs.pop(SAMPLE_INDEX_KEY, None) if isinstance(inputs, MutableMapping) else None


@dataclass
class MicroBatch:
    """One micro-batch of a step: its tags (on device), its loss as Trainer returned it, its inputs (or None)."""

    indices: torch.Tensor
    loss: torch.Tensor | None
    inputs: Mapping[str, Any] | None


LossFunction = Callable[[Mapping[str, Any], int], torch.Tensor]  # (inputs, samples) -> per-sample losses
ReplayFunction = Callable[[list[Mapping[str, Any]]], tuple[torch.Tensor, torch.Tensor]]  # -> (loss, grad norm)


class SampleRecord:
    """The micro-batches of the recent optimizer steps, bounded by what the stability callbacks may still report.

    Each callback that reports events declares, with :meth:`hold`, the first step it may still name (its
    indices) and the first step whose inputs it may still need (per-sample losses): the skip callback the
    oldest step still queued (at most ``max_consecutive_skips`` steps back), spike rollback the step after its
    oldest snapshot (at most ``(snapshot_keep + 1) x snapshot_interval + spike_check_interval`` steps back) and,
    for inputs, the step after its last check (at most ``spike_check_interval`` back). Older steps are dropped
    when a new step starts; with no holder only the current step is kept.

    ``loss_fn`` (the trainer's per-sample losses of a micro-batch) enables per-sample losses, ``replay_fn`` (the
    trainer's loss and gradient norm of a step's micro-batches, no update) the spike replay; with neither, no
    inputs are kept.
    """

    def __init__(self, index_kind: str, loss_fn: LossFunction | None, replay_fn: ReplayFunction | None = None) -> None:
        self.index_kind = index_kind
        self.loss_fn = loss_fn
        self.replay_fn = replay_fn
        self._steps: dict[int, list[MicroBatch]] = {}  # in step order: steps only grow within a run
        self._with_inputs: deque[int] = deque()  # the steps whose inputs are still held, oldest first
        self._holds: dict[str, int] = {}
        self._input_holds: dict[str, int] = {}

    def clear(self) -> None:
        """A new run starts: forget every step and holder."""
        self._steps, self._holds, self._input_holds = {}, {}, {}
        self._with_inputs.clear()

    def add(self, step: int, indices: torch.Tensor, loss: torch.Tensor | None, inputs: Mapping[str, Any]) -> None:
        """Record one micro-batch of ``step`` (no host read)."""
        keep_inputs = self.keeps_inputs
        micro_batches = self._steps.get(step)
        if micro_batches is None:
            micro_batches = self._steps[step] = []
            self._prune(step)
            if keep_inputs:
                self._with_inputs.append(step)
        if loss is not None and loss.requires_grad:
            loss = loss.detach()
        micro_batches.append(MicroBatch(indices, loss, inputs if keep_inputs else None))

    @property
    def keeps_inputs(self) -> bool:
        return self.loss_fn is not None or self.replay_fn is not None

    def hold(self, owner: str, indices_from: int, inputs_from: int | None = None) -> None:
        """``owner`` may still report steps from ``indices_from`` on, with per-sample losses from ``inputs_from``."""
        self._holds[owner] = indices_from
        self._input_holds[owner] = indices_from if inputs_from is None else inputs_from

    def _prune(self, current: int) -> None:
        """Drop the steps no holder may report, and the inputs no holder may need (oldest first: O(dropped))."""
        keep = min(self._holds.values(), default=current)
        while self._steps and (oldest := next(iter(self._steps))) < keep:
            del self._steps[oldest]
        keep_inputs = min(self._input_holds.values(), default=current)
        while self._with_inputs and self._with_inputs[0] < keep_inputs:
            for micro_batch in self._steps.get(self._with_inputs.popleft(), []):
                micro_batch.inputs = None

    def steps(self) -> list[int]:
        """The steps recorded, oldest first."""
        return sorted(self._steps)

    def host_indices(self, steps: list[int]) -> dict[int, list[list[int]]]:
        """Per step, the indices of each micro-batch, read to the host at once (one read for all of them)."""
        parts = [(step, mb.indices) for step in steps for mb in self._steps.get(step, [])]
        if not parts:
            return {step: [] for step in steps}
        flat = torch.cat([indices.reshape(-1).to(parts[0][1].device) for _, indices in parts]).tolist()
        result: dict[int, list[list[int]]] = {step: [] for step in steps}
        offset = 0
        for step, indices in parts:
            result[step].append(flat[offset : offset + indices.numel()])
            offset += indices.numel()
        return result

    def sample_losses(self, step: int) -> list[dict[str, Any]] | None:
        """Each sample's loss of ``step``'s flagged micro-batches, worst first; ``None`` when unknown.

        Flagged: the micro-batches whose own loss is non-finite, else all of them (`per_sample_losses`). A sample
        without any label (every one ``-100``: no masked token, say) has no loss of its own: its 0/0 would read as
        non-finite and blame an innocent sample, so it is left out.
        """
        micro_batches = self._steps.get(step, [])
        if self.loss_fn is None or not micro_batches or any(mb.inputs is None for mb in micro_batches):
            return None
        losses = [mb.loss.float().reshape(()) for mb in micro_batches if mb.loss is not None]
        finite = torch.stack(losses).isfinite().tolist() if len(losses) == len(micro_batches) else []
        chosen = [i for i, ok in enumerate(finite) if not ok] or list(range(len(micro_batches)))
        per_batch, scored = [], []
        for position in chosen:
            inputs = micro_batches[position].inputs
            assert inputs is not None  # checked above
            count = micro_batches[position].indices.numel()
            per_batch.append(self.loss_fn(inputs, count).float().reshape(-1))
            scored.append(_rows_with_labels(inputs, count))
        values, has_label = torch.cat(per_batch).tolist(), torch.cat(scored).tolist()
        indices = self.host_indices([step])[step]
        found = [{"index": index, "micro_batch": position} for position in chosen for index in indices[position]]
        for entry, value in zip(found, values, strict=True):
            entry["loss"] = value
        return sorted((entry for entry, kept in zip(found, has_label, strict=True) if kept), key=_worst_first)

    def replay(self, step: int) -> dict[str, float] | None:
        """``step``'s micro-batches run again from the weights now in place: ``{"loss", "grad_norm"}`` (one read),
        or ``None`` when the replay is off or the inputs are no longer held."""
        micro_batches = self._steps.get(step, [])
        batches = [mb.inputs for mb in micro_batches if mb.inputs is not None]
        if self.replay_fn is None or not micro_batches or len(batches) < len(micro_batches):
            return None
        values = self.replay_fn(batches)
        loss, grad_norm = torch.stack([value.detach().float().reshape(()) for value in values]).tolist()
        return {"loss": loss, "grad_norm": grad_norm}


def _worst_first(entry: dict[str, Any]) -> tuple[bool, float]:
    """Sort key: non-finite losses first, then the largest."""
    return (math.isfinite(entry["loss"]), -entry["loss"] if math.isfinite(entry["loss"]) else 0.0)


def per_sample_losses(model: torch.nn.Module, loss_of: Callable[[dict[str, Any]], torch.Tensor],
                      inputs: Mapping[str, Any], count: int) -> torch.Tensor:
    """The loss of each of the ``count`` samples of a micro-batch: one forward per sample (model-agnostic: any
    loss the labels define, causal, seq2seq or masked), without gradients, in eval mode (no dropout); the
    model's mode and the RNG state are restored after."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    training = model.training
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            return torch.stack([loss_of(_row(inputs, row, count)).detach().float().reshape(())
                                for row in range(count)])
        finally:
            model.train(training)


def replay_step(model: torch.nn.Module, loss_of: Callable[[dict[str, Any]], torch.Tensor],
                batches: list[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (mean over the micro-batches) and its gradient norm of one step's micro-batches, in training mode,
    without touching ``.grad`` (`torch.autograd.grad`: no gradient accumulation, no DDP hook) and with the RNG
    state restored after: nothing of the training state changes."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    parameters = [p for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=devices):
        loss = torch.stack([loss_of(dict(inputs)).float().reshape(()) for inputs in batches]).mean()
        grads = [g for g in torch.autograd.grad(loss, parameters, allow_unused=True) if g is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    return loss.detach(), norm


def _rows_with_labels(inputs: Mapping[str, Any], count: int) -> torch.Tensor:
    """Per row of a micro-batch of ``count`` samples: does it hold a label (any not ``-100``, Trainer's ignore
    index)? All rows count when the batch has no ``labels`` tensor (a custom loss)."""
    labels = inputs.get("labels")
    if not isinstance(labels, torch.Tensor) or not labels.dim() or labels.shape[0] != count:
        return torch.ones(count, dtype=torch.bool)
    return (labels.reshape(count, -1) != -100).any(dim=1).cpu()


def _row(inputs: Mapping[str, Any], row: int, count: int) -> dict[str, Any]:
    """Row ``row`` of a micro-batch of ``count`` samples: every tensor with that batch dimension sliced."""
    return {key: value[row : row + 1] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == count
            else value for key, value in inputs.items()}


def process_rank() -> int:
    """This process's rank (0 without torch.distributed), as the events number ranks."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather(local: Any) -> list[Any]:
    """Every rank's ``local``, in rank order (one all_gather_object when several ranks train)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def event_samples(record: SampleRecord | None, step: int, flagged: bool,
                  between: tuple[int, int] | None = None, replay: dict[str, Any] | None = None) -> dict[str, Any]:
    """The event fields naming ``step``'s samples on every rank; **call it on every rank** (it gathers).

    ``flagged``: this rank raised the flag the event is about (only its micro-batches get per-sample losses,
    when the record computes them). ``between``: also list the recorded steps strictly inside this ``(first,
    last)`` range (a rollback's steps between the restored snapshot and the spike), the ``LISTED_STEPS`` nearest
    the spike, the count of the others in ``between_truncated``. ``replay``: this rank's spike replay
    (`SampleRecord.replay` and its verdict ``reproduced``), gathered into the ``replay`` field. Returns ``{}``
    without a record (a plain `Trainer`).
    """
    if record is None:
        return {}
    listed: list[int] = []
    truncated = 0
    if between is not None:
        inside = [s for s in record.steps() if between[0] < s < between[1]]
        listed, truncated = inside[-LISTED_STEPS:], max(0, len(inside) - LISTED_STEPS)
    indices = record.host_indices([step, *listed])
    worst = record.sample_losses(step) if flagged else None
    local = {"rank": process_rank(), "flagged": flagged, "micro_batches": indices[step],
             "losses": worst, "between": {s: indices[s] for s in listed}, "replay": replay}
    ranks = _gather(local)
    fields: dict[str, Any] = {
        "index_kind": record.index_kind,
        "samples": [{"rank": r["rank"], "micro_batches": r["micro_batches"]} for r in ranks],
    }
    known = [dict(rank=r["rank"], **loss) for r in ranks for loss in (r["losses"] or [])]
    if known:
        known.sort(key=_worst_first)
        fields["worst_samples"] = known[:WORST_SAMPLES]
    if between is not None:
        fields["between_steps"] = [{"step": s, "samples": [{"rank": r["rank"], "micro_batches": r["between"][s]}
                                                           for r in ranks]} for s in listed]
        fields["between_truncated"] = truncated
    replays = [{"rank": r["rank"], "flagged": r["flagged"], **r["replay"]} for r in ranks if r["replay"]]
    if replays:  # the figures of the first rank whose own value spiked; every rank's when several train
        shown = next((r for r in replays if r["flagged"]), replays[0])
        fields["replay"] = {"reproduced": any(r["reproduced"] for r in replays), "loss": shown["loss"],
                            "grad_norm": shown["grad_norm"]}
        if len(ranks) > 1:
            fields["replay"]["ranks"] = [{k: v for k, v in r.items() if k != "flagged"} for r in replays]
    fields["_blamed"] = _blamed(ranks, step)
    if "replay" in fields:
        for entry in fields["_blamed"]:
            entry["reproduced"] = fields["replay"]["reproduced"]
    return fields


def _blamed(ranks: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """The samples an event blames: those with a non-finite per-sample loss when known, else every sample of
    the flagged ranks' micro-batches (of every rank when none is flagged, e.g. a spike seen elsewhere)."""
    nonfinite = [dict(rank=r["rank"], **loss) for r in ranks for loss in (r["losses"] or [])
                 if not math.isfinite(loss["loss"])]
    if nonfinite:
        return [{**entry, "step": step} for entry in nonfinite]
    flagged = [r for r in ranks if r["flagged"]] or ranks
    losses = {(r["rank"], loss["index"]): loss["loss"] for r in ranks for loss in (r["losses"] or [])}
    return [{"index": index, "rank": r["rank"], "micro_batch": position, "step": step,
             **({"loss": losses[(r["rank"], index)]} if (r["rank"], index) in losses else {})}
            for r in flagged for position, micro_batch in enumerate(r["micro_batches"]) for index in micro_batch]


def record_bad_samples(output_dir: str | os.PathLike, event: str, fields: dict[str, Any]) -> None:
    """Add the samples ``fields`` blame (from `event_samples`) to ``stability_bad_samples.json`` (main process).

    The file maps each sample index to the events that named it; an existing file (a resumed run's) is merged
    into, and the new one replaces it atomically. A side file never stops training: a file that cannot be read is
    moved aside (``stability_bad_samples.unreadable-<time>.json``), one that cannot be written is warned about.
    """
    blamed = fields.get("_blamed") or []
    if not blamed:
        return
    path = Path(output_dir) / BAD_SAMPLES_FILENAME
    try:
        _write_bad_samples(path, _read_or_move_aside(path), event, fields["index_kind"], blamed)
    except OSError as error:
        warnings.warn(f"{path}: could not write the bad samples ({error}); training goes on, the events name them.",
                      UserWarning, stacklevel=2)


def _read_or_move_aside(path: Path) -> dict[str, list[dict[str, Any]]]:
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict) and all(isinstance(events, list) for events in loaded.values()):
            return loaded
    except (ValueError, UnicodeDecodeError):
        pass
    aside = path.with_name(f"{path.stem}.unreadable-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    path.replace(aside)
    warnings.warn(f"{path} could not be read as sample index -> events: moved to {aside.name}, a new one is started.",
                  UserWarning, stacklevel=3)
    return {}


def _write_bad_samples(path: Path, data: dict[str, list[dict[str, Any]]], event: str, index_kind: str,
                       blamed: list[dict[str, Any]]) -> None:
    for entry in blamed:
        record = {"step": entry["step"], "event": event, "rank": entry["rank"], "micro_batch": entry["micro_batch"],
                  "index_kind": index_kind}
        if "loss" in entry:
            record["loss"] = entry["loss"] if math.isfinite(entry["loss"]) else str(entry["loss"])  # JSON has no NaN
        if "reproduced" in entry:
            record["reproduced"] = entry["reproduced"]
        data.setdefault(str(entry["index"]), []).append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def public(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields an event records (without the internal list of blamed samples)."""
    return {key: value for key, value in fields.items() if not key.startswith("_")}
