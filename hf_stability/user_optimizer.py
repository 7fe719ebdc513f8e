"""The optimizer and LR scheduler a user brings, as the protections treat them: whole, skipped whole, cut everywhere.

- **Whole.** The unit that is snapshotted, restored and skipped is the optimizer the user passed (or Trainer
  built), inside accelerate's wrapper only (`user_optimizer`). A user's own wrapper (Lookahead: the inner
  optimizer at ``.optimizer``, its own slow weights and step counter) is covered through its own
  ``state_dict()``/``load_state_dict()``; unwrapping it too would leave its state and its step logic out.
- **Skipped whole.** Gradients set to ``None`` make torch's optimizers leave their state alone, but not a
  wrapper's own step logic (a Lookahead still counts the step and interpolates its weights). A step skipped on
  the host therefore does not call the user's ``step()`` at all (`hold_step`).
- **Cut everywhere.** A rollback's ``rollback_lr_factor`` must survive the next ``scheduler.step()``, whatever
  the scheduler recomputes the LR from: param groups, ``base_lrs``, floors, cycle bounds, and the children of
  composite schedulers (`scale_learning_rate`). What cannot be cut is refused at ``on_train_begin``
  (`check_lr_cut`), in one line.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_stability._compat import (
    LR_SCHEDULER_CLASSES,
    PARAM_GROUP_LR_KEYS,
    child_schedulers,
    scale_scheduler_lrs,
    unwrap_optimizer,
    unwrap_scheduler,
    wrapped_optimizers,
)

user_optimizer = unwrap_optimizer

_NO_STEP_ATTRIBUTE = object()


def hold_step(optimizer: Any) -> None:
    """Make the user's next ``optimizer.step()`` a no-op (one call only): the update of this step is dropped.

    Installed as an instance attribute over whatever ``step`` was there (an LR scheduler's tracking wrapper
    included) and put back by the call itself or by `release_step`, whichever comes first.
    """
    target = user_optimizer(optimizer)
    if getattr(target.step, "_hf_stability_held", False):
        return
    previous = vars(target).get("step", _NO_STEP_ATTRIBUTE)

    def held(closure: Any = None) -> None:
        _put_back(target, previous)

    held._hf_stability_held = True  # type: ignore[attr-defined]
    held._hf_stability_previous = previous  # type: ignore[attr-defined]
    target.step = held


def release_step(optimizer: Any) -> None:
    """Undo `hold_step` if its no-op was not called (a step that raised, or one the grad scaler skipped)."""
    target = user_optimizer(optimizer)
    step = getattr(target, "__dict__", {}).get("step")
    if getattr(step, "_hf_stability_held", False):
        _put_back(target, step._hf_stability_previous)  # type: ignore[union-attr]


def _put_back(target: Any, previous: object) -> None:
    if previous is _NO_STEP_ATTRIBUTE:
        vars(target).pop("step", None)
    else:
        target.step = previous


def _schedulers(scheduler: Any) -> list[Any]:
    """``scheduler`` (inside accelerate's wrapper) and, recursively, the children of composite schedulers."""
    found = [] if scheduler is None else [unwrap_scheduler(scheduler)]
    for item in found:
        found.extend(child_schedulers(item))
    return found


def check_lr_cut(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Refuse, in one line, an optimizer or scheduler on which a rollback's LR cut by ``factor`` cannot hold."""
    if factor == 1.0:
        return
    for layer in wrapped_optimizers(optimizer):
        if any(group.get("relative_step") for group in getattr(layer, "param_groups", [])):
            raise ValueError(
                f"rollback_lr_factor={factor} cannot lower the step size of {type(layer).__name__}"
                "(relative_step=True), which computes it from its step count and ignores the learning rate: "
                "set rollback_lr_factor=1.0, or use relative_step=False with a learning rate."
            )
    for item in _schedulers(scheduler):
        if not isinstance(item, LR_SCHEDULER_CLASSES):
            raise ValueError(
                f"rollback_lr_factor={factor} needs an LR scheduler derived from torch's own (LambdaLR, SequentialLR, "
                f"OneCycleLR, ...), whose LR sources hf-stability can scale; {type(item).__name__} is not: set "
                "rollback_lr_factor=1.0 or use a torch scheduler."
            )


def scale_learning_rate(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Multiply the LR everywhere a torch scheduler or optimizer reads it from, so that the cut holds.

    Param groups (of the user's optimizer and any optimizer it wraps): ``lr`` and the LR-valued keys schedulers
    keep there (OneCycleLR's ``initial_lr``/``max_lr``/``min_lr``, SWALR's ``swa_lr``); a tensor LR is scaled in
    place, as torch's schedulers update it. Schedulers, children of `SequentialLR`/`ChainedScheduler` included:
    ``base_lrs`` and every other LR they derive from (`_compat.SCHEDULER_LR_ATTRIBUTES`). Scaling only the param
    groups would be undone by the next ``scheduler.step()`` of any closed-form schedule.
    """
    if factor == 1.0:
        return
    seen: set[int] = set()
    for layer in wrapped_optimizers(optimizer):
        for group in getattr(layer, "param_groups", []):
            if id(group) in seen:
                continue
            seen.add(id(group))
            for key in PARAM_GROUP_LR_KEYS:
                value = group.get(key)
                if isinstance(value, torch.Tensor):
                    value.mul_(factor)
                elif isinstance(value, (float, int)) and not isinstance(value, bool):
                    group[key] = value * factor
    for item in _schedulers(scheduler):
        scale_scheduler_lrs(item, factor)
