"""What a stability callback needs to resume right, under `StabilityTrainer` and under a plain `Trainer`.

On ``resume_from_checkpoint`` Trainer replaces each `ExportableState` callback by
``type(cb)(**stored["args"])`` plus the stored attributes. Two things go wrong with that alone:

- The stored *settings* (``args``) would silently replace the ones given for the resumed run. Here each
  callback records its settings when its trainer is built (``on_init_end``; `StabilityTrainer` calls it
  for the callbacks it adds) in a per-model record, and the restored copy takes them back when training
  begins. Counters and the detector window (``attributes``) come back from the checkpoint; knobs do not.
- A checkpoint written without these callbacks (a plain `Trainer`, the migration path) has no entry for
  them in ``state.stateful_callbacks``, and Trainer's next checkpoint save raises ``KeyError`` halfway,
  leaving a checkpoint without ``trainer_state.json``. The entry is added when training begins.

When training begins, the main process also brings ``stability_events.jsonl`` in line with the state the
run starts from (`StabilityEventLog.start_run`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_stability.events import StabilityEventLog

# The settings each callback type was given for the run training a model (held weakly, dropped with the model).
_RUN_SETTINGS: weakref.WeakKeyDictionary[torch.nn.Module, dict[type, dict[str, Any]]] = weakref.WeakKeyDictionary()


class ResumableCallback(TrainerCallback, ExportableState):
    """Base of the stateful stability callbacks: exported ``args`` are settings, ``attributes`` are state.

    Subclasses implement ``state()`` (Trainer's format) and :meth:`apply_settings`, and call
    :meth:`begin_run` first thing in ``on_train_begin``.
    """

    def apply_settings(self, settings: dict[str, Any]) -> None:
        """Take ``settings`` (a ``state()["args"]`` of this type) in place of the current ones."""
        raise NotImplementedError

    def on_init_end(self, args, state, control, model: torch.nn.Module | None = None, **kwargs):
        if model is not None:
            _RUN_SETTINGS.setdefault(model, {})[type(self)] = dict(self.state()["args"])

    def begin_run(self, args, state, model: torch.nn.Module | None) -> None:
        """Take this run's settings back after a restore, register for checkpoints, align the events file."""
        given = None if model is None else _RUN_SETTINGS.get(model, {}).get(type(self))
        if given is not None and given != self.state()["args"]:
            self.apply_settings(given)
        if isinstance(state.stateful_callbacks, dict):
            state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        if state.is_world_process_zero:
            StabilityEventLog(args.output_dir).start_run(state.global_step)
