"""The one seam between hf-stability and the upstream internals it relies on.

Every private name of torch, transformers and accelerate the package uses, and every rule of theirs it
re-derives, lives here, each with the upstream behaviour relied on and the versions it was verified with
(`TRANSFORMERS_VERIFIED`, `ACCELERATE_VERIFIED`, `TORCH_VERIFIED` below). When an upgrade breaks one, this file is
the place to look; `check_trainer_hooks` makes the `Trainer` seams fail loudly at construction rather than
leave a protection silently inactive.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import transformers.optimization as transformers_optimization
from accelerate.state import AcceleratorState, PartialState

if TYPE_CHECKING:
    # The type `transformers.utils.logging.get_logger` is annotated with (a Protocol of `logging.Logger`'s methods,
    # in the private `transformers._typing`, 5.19-5.25); at runtime it returns a `logging.Logger`.
    from transformers._typing import TransformersLogger as TransformersLogger

# The one home of the tested range, which README.md and docs/trainer.md cite (tests/integration/test_compat.py
# checks both): what CI runs the suite on. The floors are pyproject.toml's (`make test-floor`); the tops are the
# latest releases that `make install` resolved in CI (`make test`). Raise a top when CI passes on a newer release.
TRANSFORMERS_VERIFIED = ("5.19.0", "5.25.0")
ACCELERATE_VERIFIED = ("1.10.1", "1.16.0")
TORCH_VERIFIED = "2.13"
TESTED_RANGE = (
    f"transformers {TRANSFORMERS_VERIFIED[0]} to {TRANSFORMERS_VERIFIED[1]} "
    f"(accelerate {ACCELERATE_VERIFIED[0]} to {ACCELERATE_VERIFIED[1]})"
)
SUPPORTED = f"hf-stability supports {TESTED_RANGE}"
_untested_warned = False


def untested_versions(transformers_version: str, accelerate_version: str) -> str | None:
    """One line naming each upstream version outside its tested range, or ``None`` when both are inside.

    A pre-release or a version above the top is untested too: the seams below may have moved.
    """
    from packaging.version import Version

    outside = [
        f"{name} {version}"
        for name, version, (low, high) in (
            ("transformers", transformers_version, TRANSFORMERS_VERIFIED),
            ("accelerate", accelerate_version, ACCELERATE_VERIFIED),
        )
        if not Version(low) <= Version(version) <= Version(high)
    ]
    if not outside:
        return None
    return (
        f"hf-stability: running with {' and '.join(outside)}, outside the range CI tests ({TESTED_RANGE}); "
        "the upstream hooks are still checked at construction, but report any failure."
    )


def warn_untested_versions() -> None:
    """Log `untested_versions` of the installed packages once per process, on the main process only."""
    global _untested_warned
    if _untested_warned:
        return
    _untested_warned = True
    import accelerate
    import transformers

    from hf_stability._logging import get_logger

    message = untested_versions(transformers.__version__, accelerate.__version__)
    if message is not None:
        get_logger(__name__).warning(message)


class UpstreamChangedError(RuntimeError):
    """An upstream internal that hf-stability relies on is gone or no longer used the way it was verified."""


# --- transformers.Trainer -------------------------------------------------------------------------------------

# The methods that make up Trainer's training loop (5.19-5.25: `_inner_training_loop` calls `_init_training_state`,
# which resumes, then `_run_epoch` per epoch, which runs the steps). A hook counts as called when one of them
# references it by name.
# `_run_epoch` calls `_maybe_log_save_evaluate` after each step and epoch, which writes every checkpoint.
TRAINING_LOOP = ("_inner_training_loop", "_init_training_state", "_run_epoch", "_maybe_log_save_evaluate")

# Trainer methods `StabilityTrainer` (and its `BatchRampMixin`) override, wrap or call, and why each must stay so.
TRAINER_HOOKS: Mapping[str, str] = {
    # `_run_epoch` calls `grad_norm = self._get_grad_norm(model, grad_norm=grad_norm)` on every sync step, after
    # `_clip_grad_norm` returned the norm *before* clipping and before `on_pre_optimizer_step`: the override shares
    # that pre-clip norm with the callbacks, which run after clipping and could only see the clipped norm.
    "_get_grad_norm": "overridden to share the pre-clip gradient norm with the callbacks",
    # `_run_epoch` fetches `gradient_accumulation_steps` items per step through it (the batch ramp's placeholders).
    "get_batch_samples": "overridden to feed the batch ramp's micro-batches",
    # `_run_epoch` calls it per micro-batch, after setting `current_gradient_accumulation_steps = len(batch_samples)`
    # (the loss divisor when the loss is not normalised by `num_items_in_batch`); its return is the loss backpropagated.
    "training_step": "wrapped to share the step's loss with the callbacks, overridden to skip the ramp's placeholders",
    # `_maybe_log_save_evaluate` calls `self._save_checkpoint(model, trial)` whenever `control.should_save` is set
    # (save strategy, `save_strategy="best"` after an evaluation, the last step, any callback), then `on_save`.
    "_save_checkpoint": "wrapped to judge the weights of every checkpoint before it is written",
}
# Trainer methods overridden by `ExcludeSamplesMixin` that Trainer calls from `get_train_dataloader`, not the loop.
TRAINER_DATA_HOOKS: Mapping[str, str] = {
    # `get_train_dataloader` passes it as `sampler_fn` to `_get_dataloader`, which calls it for a map-style dataset.
    "_get_train_sampler": "overridden to leave the `exclude_samples` out of the train sampler",
}
# Private helpers called as Trainer calls them (5.19-5.25: same signatures), by `BatchRampMixin.get_train_dataloader`.
TRAINER_HELPERS = ("_remove_unused_columns", "_get_collator_with_removed_columns", "_get_num_items_in_batch")


def _referenced_names(code: CodeType) -> Iterator[str]:
    """Attribute and global names a function's code (nested functions included) refers to."""
    yield from code.co_names
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            yield from _referenced_names(constant)


def check_trainer_hooks(upstream: type) -> None:
    """Raise `UpstreamChangedError` unless ``upstream`` (the `Trainer` class whose methods `StabilityTrainer`
    overrides) still defines every hook and helper above and its training loop still calls each hook.

    A hook that is gone or no longer called would leave a protection silently inactive (e.g. spike rollback on
    ``grad_norm`` judging clipped norms), so construction stops with the supported range instead.
    """
    missing = {name for name in (*TRAINER_HOOKS, *TRAINER_HELPERS) if not callable(getattr(upstream, name, None))}
    loop = [inspect.unwrap(method) for name in TRAINING_LOOP if callable(method := getattr(upstream, name, None))]
    codes = [code for method in loop if isinstance(code := getattr(method, "__code__", None), CodeType)]
    called = {name for code in codes for name in _referenced_names(code)}
    loader = getattr(getattr(upstream, "get_train_dataloader", None), "__code__", None)
    loader_calls = set(_referenced_names(loader)) if isinstance(loader, CodeType) else set()
    problems = []
    for name, why in TRAINER_DATA_HOOKS.items():
        if not callable(getattr(upstream, name, None)):
            problems.append(f"`{upstream.__name__}.{name}` is gone ({why})")
        elif name not in loader_calls:
            problems.append(f"`{upstream.__name__}.get_train_dataloader` no longer calls `{name}` ({why})")
    for name in (*TRAINER_HOOKS, *TRAINER_HELPERS):
        why = TRAINER_HOOKS.get(name, "called by the batch ramp")
        if name in missing:
            problems.append(f"`{upstream.__name__}.{name}` is gone ({why})")
        elif name in TRAINER_HOOKS and name not in called:
            problems.append(f"`{upstream.__name__}` no longer calls `{name}` in {'/'.join(TRAINING_LOOP)} ({why})")
    if problems:
        import transformers

        raise UpstreamChangedError(
            f"StabilityTrainer cannot run on transformers {transformers.__version__}: {'; '.join(problems)}. "
            f"{SUPPORTED}."
        )


def calling_trainer(callback: Any) -> Any:
    """The `Trainer` whose callback list holds ``callback`` and that is calling it now, or ``None``.

    Trainer hands callbacks no reference to itself (5.19-5.25: `CallbackHandler.call_event` passes the model,
    optimizer, scheduler and dataloaders), but every event reaches them from a `Trainer` method, whose frame
    holds it as ``self``; `StabilityTrainer.__init__` calls ``on_init_end`` itself, likewise. ``None`` when no
    Trainer is calling (a custom loop).
    """
    from transformers import Trainer

    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None)  # None while Trainer.__init__ has not built it
        if isinstance(owner, Trainer) and handler is not None and any(c is callback for c in handler.callbacks):
            return owner
        frame = frame.f_back
    return None


_List = TypeVar("_List", bound=list)


def ordered_callback_list(trainer: Any, list_class: type[_List]) -> _List:
    """``trainer``'s callback list as a ``list_class`` (a list subclass that keeps an order), swapped in once.

    transformers 5.x: `CallbackHandler` keeps its callbacks in the plain list attribute ``callbacks`` and adds to
    it with ``append`` (``add_callback`` and the restore of ``resume_from_checkpoint``), the calls a subclass sees.
    """
    handler = trainer.callback_handler
    if not isinstance(handler.callbacks, list_class):
        handler.callbacks = list_class(handler.callbacks)
    return handler.callbacks


def route_checkpoint_writes(
    trainer: Any, write_allowed: Callable[[Any], bool], refuse_model: Callable[[Any, str | None], None]
) -> None:
    """Send this trainer's checkpoint and model writes through the given judges, once per trainer.

    `Trainer._save_checkpoint(model, trial)` writes every checkpoint (see ``TRAINER_HOOKS``); it runs only when
    ``write_allowed(trainer)``. `Trainer.save_model(output_dir, _internal_call)` (also called by
    `_save_checkpoint` and ``push_to_hub``) calls ``refuse_model(trainer, output_dir)`` first. Both are wrapped on
    the instance, around the methods Trainer would call (a subclass's overrides included), so the class and other
    trainers are untouched.
    """
    if vars(trainer).get("_hf_stability_writes_routed"):
        return
    if not callable(getattr(trainer, "_save_checkpoint", None)):
        raise UpstreamChangedError(f"`Trainer._save_checkpoint` is gone (it writes every checkpoint). {SUPPORTED}.")
    save_checkpoint, save_model = trainer._save_checkpoint, trainer.save_model

    def judged_save_checkpoint(model: Any, trial: Any) -> None:
        if write_allowed(trainer):
            save_checkpoint(model, trial)

    def judged_save_model(output_dir: str | None = None, _internal_call: bool = False) -> None:
        refuse_model(trainer, output_dir)
        save_model(output_dir, _internal_call)

    trainer._save_checkpoint, trainer.save_model = judged_save_checkpoint, judged_save_model
    trainer._hf_stability_writes_routed = True


def remove_unused_columns(trainer: Any, dataset: Any) -> Any:
    """`Trainer._remove_unused_columns(dataset, description="training")`: drop what the model's forward ignores."""
    return trainer._remove_unused_columns(dataset, description="training")


def collator_with_removed_columns(trainer: Any, collator: Any) -> Any:
    """`Trainer._get_collator_with_removed_columns`: the same for a dataset that is no `datasets.Dataset`."""
    return trainer._get_collator_with_removed_columns(collator, description="training")


def num_items_in_batch(trainer: Any, batches: list, device: torch.device) -> Any:
    """`Trainer._get_num_items_in_batch`: label tokens in ``batches`` (all ranks), the loss normaliser."""
    return trainer._get_num_items_in_batch(batches, device)


# --- transformers.DefaultFlowCallback's rules, re-derived -------------------------------------------------------
# Callbacks must know *before* the optimizer step whether Trainer will log or save after it, which
# `DefaultFlowCallback.on_step_end` decides only afterwards. Its rules (5.19-5.25): log when
# `global_step == 1 and logging_first_step`, or `logging_strategy == "steps"` and `global_step % state.logging_steps
# == 0`; save when `save_strategy == "steps"` and (`state.save_steps > 0` and `global_step % state.save_steps == 0`,
# or `global_step >= state.max_steps`).


def is_logging_step(args: Any, state: Any, step: int) -> bool:
    """Whether Trainer's `DefaultFlowCallback` will log after optimizer step ``step`` (``"steps"`` strategy)."""
    if getattr(args, "logging_first_step", False) and step == 1:
        return True
    interval = getattr(state, "logging_steps", 0) or 0
    return getattr(args, "logging_strategy", None) == "steps" and interval > 0 and step % interval == 0


def is_saving_step(args: Any, state: Any, step: int) -> bool:
    """Whether Trainer's `DefaultFlowCallback` will save a checkpoint after optimizer step ``step``."""
    if getattr(args, "save_strategy", None) != "steps":
        return False
    return (state.save_steps > 0 and step % state.save_steps == 0) or (state.max_steps > 0 and step >= state.max_steps)


def load_finished_checkpoint(trainer: Any, checkpoint: str) -> None:
    """Load a checkpoint's weights and trainer state into ``trainer`` without training.

    `Trainer.train(resume_from_checkpoint=...)` from a checkpoint that already reached ``max_steps`` runs one more
    optimizer step (the stop is checked only after a step; transformers 5.19-5.25), so a finished run is loaded
    with Trainer's own `_load_from_checkpoint` (weights, 5.19-5.25) and `TrainerState.load_from_json` instead.
    """
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))


def output_dir(args: Any) -> str:
    """``args.output_dir``, declared ``str | None``: `TrainingArguments.__post_init__` replaces None by
    ``"trainer_output"`` (5.19-5.25), so a built `TrainingArguments` always has one."""
    if args.output_dir is None:
        raise UpstreamChangedError(f"TrainingArguments left `output_dir` None after __post_init__; {SUPPORTED}.")
    return str(args.output_dir)


# --- accelerate -------------------------------------------------------------------------------------------------
# `AcceleratedOptimizer` keeps the wrapped optimizer in `.optimizer` and the fp16 `GradScaler` (or None) in
# `.scaler`; `AcceleratedScheduler` keeps the wrapped scheduler in `.scheduler` (1.10.1-1.16.0). The scaler keys its
# per-optimizer state by the optimizer inside all wrapper layers (`Accelerator.unscale_gradients`). Read by
# attribute, so any wrapper shaped alike works; anything else is returned as it is (custom loops).


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer the user passed (or Trainer built), inside accelerate's wrapper(s) only.

    Unwrapped like `Accelerator.unscale_gradients` does (``while isinstance(opt, AcceleratedOptimizer)``, which
    covers accelerate's DeepSpeed/Megatron wrappers, subclasses of it), plus any other ``.optimizer`` holder that is
    no `torch.optim.Optimizer` (a custom loop's wrapper). A user's own `torch.optim.Optimizer` that wraps another
    at ``.optimizer`` (Lookahead) is kept whole: it is the object whose state and step count, and the key under
    which the grad scaler keeps its state.
    """
    from accelerate.optimizer import AcceleratedOptimizer

    while hasattr(optimizer, "optimizer") and (
        isinstance(optimizer, AcceleratedOptimizer) or not isinstance(optimizer, torch.optim.Optimizer)
    ):
        optimizer = optimizer.optimizer
    return optimizer


def wrapped_optimizers(optimizer: Any) -> list[Any]:
    """The user's optimizer and every optimizer it wraps at ``.optimizer`` (Lookahead style), outermost first."""
    layers = [unwrap_optimizer(optimizer)]
    while hasattr(layers[-1], "optimizer"):
        layers.append(layers[-1].optimizer)
    return layers


def unwrap_scheduler(scheduler: Any) -> Any:
    """The LR scheduler inside accelerate's wrapper."""
    return getattr(scheduler, "scheduler", scheduler)


def grad_scaler(optimizer: Any) -> torch.amp.GradScaler | None:
    """The grad scaler accelerate attached to ``optimizer`` (fp16 mixed precision), if any."""
    return getattr(optimizer, "scaler", None)


def accelerate_shared_states() -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared state of `AcceleratorState` and `PartialState`, read without creating them.

    `_shared_state` is the (private) dict every instance shares, empty until one is created (1.10.1-1.16.0);
    instantiating the classes instead would initialise accelerate as a side effect.
    """
    return AcceleratorState._shared_state, PartialState._shared_state


# --- transformers TrainerState ----------------------------------------------------------------------------------


def register_stateful_callback(state: Any, name: str, exported: dict[str, Any]) -> None:
    """Give callback ``name`` an entry in ``state.stateful_callbacks`` if it has none.

    Trainer's checkpoint save (`_save_checkpoint` → `TrainerState.stateful_callbacks`, keyed by class name,
    5.19-5.25) raises ``KeyError`` for an `ExportableState` callback missing from a resumed state.
    """
    if isinstance(state.stateful_callbacks, dict):
        state.stateful_callbacks.setdefault(name, exported)


# --- torch ------------------------------------------------------------------------------------------------------
# `torch._foreach_*`: one fused kernel per device and dtype over a list of tensors (torch 2.13; private but used by
# torch.nn.utils.clip_grad_norm_ and the optimizers themselves). DTensors (FSDP2) are supported.
foreach_norm = torch._foreach_norm
foreach_abs = torch._foreach_abs
foreach_mul = torch._foreach_mul
foreach_mul_ = torch._foreach_mul_


def found_inf_per_device(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> dict[Any, torch.Tensor]:
    """The scaler's per-device found-inf flags of ``optimizer`` for this step (empty until unscaled).

    torch 2.13: `GradScaler.unscale_` stores them in `_per_optimizer_states[id(optimizer)]["found_inf_per_device"]`,
    and `step`/`update` read them from there, so a flag written back into them is what the scaler acts on.
    """
    return scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]


# torch optimizers whose fused step skips an update bit-exactly when given ``found_inf`` = 1, first step
# included (checked on CPU, torch 2.13). Fused SGD honours the flag too, but a skipped first step still
# creates its momentum buffer, so the next update differs from an unskipped run: SGD takes the host path.
_FOUND_INF_SKIPS_EXACTLY = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad)


def found_inf_supported(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` skips the update on device when its ``found_inf`` attribute is 1.

    torch marks such optimizers with ``_step_supports_amp_scaling`` (set by Adam, AdamW, SGD and Adagrad
    with ``fused=True``; `GradScaler.step` relies on it to pass ``found_inf`` the same way: torch 2.4–2.13)
    and reads the attribute in ``_fused_adam``/``_fused_adagrad``, which restore the step count. Older
    optimizers taking a ``grad_scaler`` keyword instead read no attribute.
    """
    return (
        isinstance(optimizer, _FOUND_INF_SKIPS_EXACTLY)
        and getattr(optimizer, "_step_supports_amp_scaling", False)
        and all(group.get("fused") for group in optimizer.param_groups)
        and "grad_scaler" not in inspect.signature(optimizer.step).parameters
    )


def set_found_inf(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> None:
    """Have the next ``step()`` skip its update iff ``flag`` (a 0-d fp32 0/1 on device) is 1: no host read."""
    optimizer.found_inf = flag  # type: ignore[attr-defined]  # 0-d: shape [1] fails


def clear_found_inf(optimizer: torch.optim.Optimizer) -> None:
    """Take the flag back after the step, so no later step (nor a GradScaler's) inherits it."""
    if hasattr(optimizer, "found_inf"):
        del optimizer.found_inf


# How long a finished collective's tensors may stay with the backend before `wait_until_backend_releases` gives up.
BACKEND_RELEASE_TIMEOUT_S = 1.0


def wait_until_backend_releases(*tensors: torch.Tensor) -> None:
    """Return once the process group no longer holds ``tensors`` (each of which only the caller should hold).

    gloo's worker thread drops its reference to a finished collective's tensors a moment after the caller has
    woken, and in torch 2.13 that drop takes the GIL (``TensorImpl::decref_pyobject``: a C++ owner of a tensor that
    has a Python object releases its hold on that object). When it comes after the interpreter has begun to shut
    down, the thread exits inside a C++ destructor and the whole process aborts ("terminate called without an
    active exception", pytorch/pytorch#190489): a script that ends right after ``trainer.train()`` fails although
    training succeeded. Yielding the GIL until the private ``Tensor._use_count`` (torch 2.13) is back to the
    caller's single reference moves that drop before our collective returns; it takes a few yields at most
    (measured on two CPU ranks: gloo still held the tensor after 18-32% of all-reduces, let go within 3 yields).
    For gloo only: other backends let go of a work's tensors on their own schedule, which this must not wait for on
    every step. A torch without ``_use_count`` is not waited for.
    """
    use_count = getattr(torch.Tensor, "_use_count", None)
    if use_count is None:
        return
    deadline = time.monotonic() + BACKEND_RELEASE_TIMEOUT_S
    for tensor in tensors:
        while use_count(tensor) > 1 and time.monotonic() < deadline:
            time.sleep(0)


def scaler_scale(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The current loss scale as a device tensor, without the host sync `get_scale()` does (torch 2.13:
    `GradScaler._get_scale_async`, None only before the first `scale()`, which Trainer calls before any step)."""
    scale = scaler._get_scale_async()
    if scale is None:
        raise UpstreamChangedError(f"GradScaler has no scale tensor yet; {SUPPORTED} with torch {TORCH_VERIFIED}.")
    return scale


# What each torch 2.13 LR scheduler computes the next LR from, besides the param groups' ``lr`` (read by the
# recursive, "chainable" forms): ``base_lrs`` (closed forms: LambdaLR, and every scheduler that `SequentialLR`
# restarts with ``_update_lr(0)`` at a milestone), ``eta_min`` (CosineAnnealingLR/-WarmRestarts), ``max_lrs``
# (CyclicLR), ``min_lrs``/``default_min_lr`` (ReduceLROnPlateau floors), and ``_last_lr``, the cache `get_last_lr()`
# and Trainer's logged ``learning_rate`` return until the next ``step()``. OneCycleLR and SWALR read param-group
# keys instead (``initial_lr``/``max_lr``/``min_lr``; ``swa_lr``). SequentialLR and ChainedScheduler keep their
# children in ``_schedulers``. transformers' `GreedyLR` (``lr_scheduler_type="greedy"``, 5.2x; no torch scheduler)
# bounds the LR by ``min_lrs``/``max_lrs`` and resets it to ``_init_lrs``.
SCHEDULER_LR_ATTRIBUTES = ("base_lrs", "eta_min", "max_lrs", "min_lrs", "default_min_lr", "_init_lrs", "_last_lr")
PARAM_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "swa_lr")
LR_SCHEDULER_CLASSES: tuple[type, ...] = (
    *(getattr(torch.optim.lr_scheduler, name) for name in (
        "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR",
        "SequentialLR", "PolynomialLR", "CosineAnnealingLR", "ChainedScheduler", "ReduceLROnPlateau", "CyclicLR",
        "CosineAnnealingWarmRestarts", "OneCycleLR",
    )),
    torch.optim.swa_utils.SWALR,
    *((greedy,) if (greedy := getattr(transformers_optimization, "GreedyLR", None)) else ()),
)


def child_schedulers(scheduler: Any) -> list[Any]:
    """The schedulers a `SequentialLR`/`ChainedScheduler` steps (``_schedulers``, torch 2.13); [] for others."""
    return list(getattr(scheduler, "_schedulers", None) or [])


def scale_scheduler_lrs(scheduler: Any, factor: float) -> None:
    """Multiply every LR-valued attribute of one scheduler (`SCHEDULER_LR_ATTRIBUTES`) by ``factor``."""
    for name in SCHEDULER_LR_ATTRIBUTES:
        value = getattr(scheduler, name, None)
        if isinstance(value, list):
            setattr(scheduler, name, [v * factor for v in value])
        elif isinstance(value, (float, int, torch.Tensor)) and not isinstance(value, bool):
            setattr(scheduler, name, value * factor)


# --- argparse ---------------------------------------------------------------------------------------------------


def parser_destinations(parser: argparse.ArgumentParser) -> set[str]:
    """The ``dest`` of every argument ``parser`` declares (`ArgumentParser._actions`, the list `add_argument`
    appends to; stable across Python 3.10-3.13 and the only way to list them)."""
    return {action.dest for action in parser._actions}
