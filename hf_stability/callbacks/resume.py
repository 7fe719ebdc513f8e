"""How a stability callback gets its settings, and what it needs to resume right, under any `Trainer`.

Settings (`ConfiguredCallback`): a keyword given to the callback's constructor wins, then the
`StabilityConfig` field of the trainer's ``args``, then the default; one rule
(`hf_stability.settings.ComponentSettings.resolve`) for every callback, applied when the trainer is built
(``on_init_end``) and again when training begins. Keywords are the flat `StabilityConfig` names; a few
callbacks also take older short ones (``aliases``). A keyword is checked once, when the callback is built;
resolving checks only the relations between knobs (`hf_stability.settings`).

Resume (`ResumableCallback`):
On ``resume_from_checkpoint`` Trainer replaces each `ExportableState` callback by
``type(cb)(**stored["args"])`` plus the stored attributes. Two things go wrong with that alone:

- The stored *settings* (``args``) would silently replace the ones given for the resumed run. Here each
  callback records the keywords it was given when its trainer is built (``on_init_end``; `StabilityTrainer`
  calls it for the callbacks it adds) in a per-trainer record, and the restored copy takes them back when
  training begins and resolves them against the resumed run's ``args``. Counters and the detector window
  (``attributes``) come back from the checkpoint; knobs do not.
- A checkpoint written without these callbacks (a plain `Trainer`, the migration path) has no entry for
  them in ``state.stateful_callbacks``, and Trainer's next checkpoint save raises ``KeyError`` halfway,
  leaving a checkpoint without ``trainer_state.json``. The entry is added when training begins.

When training begins, the main process takes the output directory's run lock (`hf_stability.run_lock`: a
second run into it is refused), then brings ``stability_events.jsonl`` in line with the state the run starts
from (`StabilityEventLog.start_run`). When training ends (`end_run`), events held in memory after a failed
write are written and the lock is released.

Stored state from another hf-stability version is checked, not trusted (`check_stored_state`): an unknown
setting or attribute, a setting out of range, a zero ``lr_scale`` or a count that is not an integer stops the
resume in one line naming the checkpoint and the field, instead of a ``TypeError`` inside Trainer's restore or a
crash at the first rollback. `StabilityTrainer` checks the checkpoint before Trainer reads it; under a plain
`Trainer` the restored attributes are checked when training begins.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint

from hf_stability._compat import calling_trainer, register_stateful_callback
from hf_stability.events import StabilityEventLog
from hf_stability.run_lock import acquire_run_lock, release_run_lock
from hf_stability.settings import ComponentSettings

# A check of one stored attribute: the problem with ``value`` in words, or None when it is fine.
AttributeCheck = Callable[[Any], "str | None"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stored_count(value: Any) -> str | None:
    """A counter: an integer >= 0 (JSON keeps ints as ints, so 2.5 or "2" was not written by a counter)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else f"must be an integer >= 0, got {value!r}"


def stored_number(value: Any) -> str | None:
    return None if _is_number(value) else f"must be a finite number, got {value!r}"


def stored_scale(value: Any) -> str | None:
    """A factor the learning rate was multiplied by: in (0, 1] (a rollback divides by it)."""
    return None if _is_number(value) and 0 < value <= 1 else f"must be a number in (0, 1], got {value!r}"


def stored_numbers(value: Any) -> str | None:
    ok = isinstance(value, list) and all(_is_number(v) for v in value)
    return None if ok else f"must be a list of finite numbers, got {str(value)[:80]}"


# The settings each callback type was given, per trainer (held weakly, dropped with it): two trainers built on one
# model (a second phase) keep their own. Without a calling Trainer (a custom loop), per model.
_RUN_SETTINGS: weakref.WeakKeyDictionary[Any, dict[type, dict[str, Any]]] = weakref.WeakKeyDictionary()


def _settings_owner(callback: TrainerCallback, model: torch.nn.Module | None) -> Any:
    """Whose run ``callback``'s given settings belong to: the `Trainer` calling it, else ``model``."""
    trainer = calling_trainer(callback)
    return model if trainer is None else trainer


class ConfiguredCallback(TrainerCallback):
    """Base of the stability callbacks: ``settings`` resolved from the constructor keywords and the trainer's args.

    Subclasses set ``settings_class`` and pass their keyword arguments (``None`` = not given) to
    ``super().__init__``; given values are checked there, once. ``configure(args)`` runs when the trainer is
    built and subclasses call it (directly or through `ResumableCallback.begin_run`) when training begins.
    """

    settings_class: ClassVar[type[ComponentSettings]]
    # Older constructor keywords still accepted (README/docs examples, checkpoints of earlier versions): old -> flat.
    aliases: ClassVar[Mapping[str, str]] = {}

    def __init__(self, **given: Any) -> None:
        self._given = self.settings_class.checked(self.flat_keywords(given))
        self.settings = self.settings_class.resolve(self._given)

    @classmethod
    def flat_keywords(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` keywords under their flat names, ``None`` (not given) left out; an alias and its name clash."""
        flat: dict[str, Any] = {}
        for key, value in given.items():
            name = cls.aliases.get(key, key)
            if value is None:
                continue
            if name in flat:
                raise TypeError(f"{cls.__name__}: `{name}` given twice (`{key}` is its older name); give it once.")
            flat[name] = value
        return flat

    def configure(self, args: Any) -> None:
        """Resolve the settings against ``args``: given keywords > its `StabilityConfig` fields > defaults."""
        self.settings = self.settings_class.resolve(self._given, args, previous=self.settings)

    def on_init_end(self, args, state, control, **kwargs):
        self.configure(args)


class ResumableCallback(ConfiguredCallback, ExportableState):
    """Base of the stateful stability callbacks: exported ``args`` are settings, ``attributes`` are state.

    Exported ``args`` are the resolved settings (what the run used); ``state()`` adds the subclass's
    ``attributes()``. Subclasses call :meth:`begin_run` first thing in ``on_train_begin``.
    """

    # Every attribute `attributes` exports, with the check its stored value must pass on resume.
    stored_attributes: ClassVar[Mapping[str, AttributeCheck]]

    def attributes(self) -> dict[str, Any]:
        """The state a checkpoint carries (counters, statistics)."""
        raise NotImplementedError

    @classmethod
    def stored_problem(cls, stored: Any) -> str | None:
        """What is wrong with one stored ``{"args": ..., "attributes": ...}`` entry of this class, or None.

        The problem names the field, e.g. ``attributes.lr_scale must be a number in (0, 1], got 0``.
        """
        if not isinstance(stored, dict):
            return f"the entry must be an object, got {stored!r}"
        args, attributes = stored.get("args", {}), stored.get("attributes", {})
        if not isinstance(args, dict) or not isinstance(attributes, dict):
            return "`args` and `attributes` must be objects"
        names = {setting.name for setting in fields(cls.settings_class)}
        for key in args:
            if cls.aliases.get(key, key) not in names:
                return f"args.{key} is not a setting of this hf-stability version (known: {sorted(names)})"
        try:
            cls.settings_class.resolve(cls.settings_class.checked(cls.flat_keywords(args)))
        except (ValueError, TypeError) as error:
            return f"args: {str(error).rstrip('.')}"
        for key, value in attributes.items():
            check = cls.stored_attributes.get(key)
            if check is None:
                return f"attributes.{key} is not an attribute of this hf-stability version"
            problem = check(value)
            if problem is not None:
                return f"attributes.{key} {problem}"
        return None

    def state(self) -> dict:
        return {"args": self.settings.as_dict(), "attributes": self.attributes()}

    def on_init_end(self, args, state, control, model: torch.nn.Module | None = None, **kwargs):
        super().on_init_end(args, state, control, **kwargs)
        owner = _settings_owner(self, model)
        if owner is not None:
            _RUN_SETTINGS.setdefault(owner, {})[type(self)] = dict(self._given)

    _run_begun = False  # set by begin_run: a later run of this same object is a second train()

    def begin_run(self, args, state, model: torch.nn.Module | None) -> None:
        """Take this run's settings back after a restore, register for checkpoints, align the events file.

        A second ``train()`` of this object starts fresh, as Trainer's own state does (a resume restores the
        checkpoint's state into new objects instead): the attributes are set back to a new callback's, the way
        Trainer restores them, so counters, budgets and the events file (cut back to step 0) agree.
        """
        owner = _settings_owner(self, model)
        given = None if owner is None else _RUN_SETTINGS.get(owner, {}).get(type(self))
        if given is not None:
            self._given = dict(given)
        if self._run_begun:
            for name, value in type(self)().attributes().items():
                setattr(self, name, value)
        self._run_begun = True
        self.configure(args)
        problem = type(self).stored_problem({"attributes": self.attributes()})
        if problem is not None:  # restored by a plain Trainer, which `check_stored_state` did not see first
            checkpoint = getattr(args, "resume_from_checkpoint", None) or f"the checkpoint of step {state.global_step}"
            raise ValueError(f"{checkpoint}: stored state of {type(self).__name__}: {problem}.")
        register_stateful_callback(state, type(self).__name__, self.state())
        if state.is_world_process_zero:
            acquire_run_lock(args.output_dir)  # before any file of the output directory is touched
            StabilityEventLog(args.output_dir).start_run(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        end_run(args, state)


def end_run(args: Any, state: Any) -> None:
    """At the end of training (or when it raises): write held events, release the output directory's lock."""
    if state.is_world_process_zero:
        StabilityEventLog(args.output_dir).flush()
        release_run_lock(args.output_dir)


def check_stored_state(checkpoint: str | os.PathLike, callbacks: Iterable[TrainerCallback]) -> None:
    """Refuse, in one line naming the checkpoint and the field, stored state ``callbacks`` could not resume from.

    Reads ``<checkpoint>/trainer_state.json``; a file that cannot be read is left to Trainer, which names it.
    """
    path = Path(checkpoint) / "trainer_state.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8")).get("stateful_callbacks") or {}
    except (OSError, ValueError, AttributeError):
        return
    for callback in callbacks:
        if not isinstance(callback, ResumableCallback) or type(callback).__name__ not in stored:
            continue
        name = type(callback).__name__
        entries = stored[name] if isinstance(stored[name], list) else [stored[name]]
        for entry in entries:
            problem = type(callback).stored_problem(entry)
            if problem is not None:
                raise ValueError(
                    f"{path}: stateful_callbacks.{name}: {problem} (written by another hf-stability version?); "
                    "cannot resume from this checkpoint."
                )


def resume_checkpoint(resume_from_checkpoint: Any, output_dir: str) -> str | None:
    """The checkpoint `Trainer.train(resume_from_checkpoint=...)` resumes from (True: the newest in ``output_dir``)."""
    if isinstance(resume_from_checkpoint, bool):
        return get_last_checkpoint(output_dir) if resume_from_checkpoint else None
    return None if resume_from_checkpoint is None else str(resume_from_checkpoint)
