"""Records which samples each optimizer step trains on, for the batch-ramp tests (one and two ranks)."""

from __future__ import annotations

from transformers import TrainerCallback


class StepRows(TrainerCallback):
    """``rows[step]``: the ``input_ids`` rows (as tuples) of every training forward of optimizer step ``step``."""

    def __init__(self) -> None:
        self.rows: dict[int, list[tuple[int, ...]]] = {}
        self._current: list[tuple[int, ...]] = []
        self._handle = None

    def _record(self, module, args, kwargs):
        if module.training:
            self._current += [tuple(row) for row in kwargs["input_ids"].tolist()]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.rows[state.global_step], self._current = self._current, []

    def on_train_end(self, args, state, control, **kwargs):
        self._handle.remove()
