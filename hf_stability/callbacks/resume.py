"""How a stability callback gets its settings, and what it needs to resume right, under any `Trainer`.

Settings (`ConfiguredCallback`): a keyword given to the callback's constructor wins, then the
`StabilityConfig` field of the trainer's ``args``, then the default; one rule
(`hf_stability.settings.ComponentSettings.resolve`) for every callback, applied when the trainer is built
(``on_init_end``) and again when training begins.

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

When training begins, the main process also brings ``stability_events.jsonl`` in line with the state the
run starts from (`StabilityEventLog.start_run`).
"""

from __future__ import annotations

import weakref
from dataclasses import fields
from typing import Any, ClassVar

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_stability._compat import calling_trainer, register_stateful_callback
from hf_stability.events import StabilityEventLog
from hf_stability.settings import ComponentSettings

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
    ``super().__init__``; explicit values are validated at once. ``configure(args)`` runs when the trainer is
    built and subclasses call it (directly or through `ResumableCallback.begin_run`) when training begins.
    """

    settings_class: ClassVar[type[ComponentSettings]]

    def __init__(self, **given: Any) -> None:
        self._given = {setting.name: given.get(setting.name) for setting in fields(self.settings_class)}
        self.settings = self.settings_class.resolve(self._given)

    def configure(self, args: Any) -> None:
        """Resolve the settings against ``args``: given keywords > its `StabilityConfig` fields > defaults."""
        self.settings = self.settings_class.resolve(self._given, args)

    def on_init_end(self, args, state, control, **kwargs):
        self.configure(args)


class ResumableCallback(ConfiguredCallback, ExportableState):
    """Base of the stateful stability callbacks: exported ``args`` are settings, ``attributes`` are state.

    Exported ``args`` are the resolved settings (what the run used); ``state()`` adds the subclass's
    ``attributes()``. Subclasses call :meth:`begin_run` first thing in ``on_train_begin``.
    """

    def attributes(self) -> dict[str, Any]:
        """The state a checkpoint carries (counters, statistics)."""
        raise NotImplementedError

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
            for name, value in type(self)(**self._given).attributes().items():
                setattr(self, name, value)
        self._run_begun = True
        self.configure(args)
        register_stateful_callback(state, type(self).__name__, self.state())
        if state.is_world_process_zero:
            StabilityEventLog(args.output_dir).start_run(state.global_step)
