"""`WeightsLedger`: what a run knows about its weights across steps, kept by the run's `StepGuard`.

Two stages judge the weights, each rarely: the skip stage at a flush that reads a flagged step, the spike stage
at a check holding a left-out value (and the check before a checkpoint write). A verdict one of them paid a
device-to-host read for is written here and read by the other, instead of a second read of the weights; both
are facts about steps, not flags of one callback read by another.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WeightsLedger:
    """Verdicts on the weights of one run (all ranks agree on ``end_of_step``; ``started_nonfinite`` is per rank)."""

    # ``(step, True)`` when some rank's weights were NaN/Inf at the end of ``step``; ``None``: not judged lately.
    end_of_step: tuple[int, bool] | None = None
    # Steps that started from non-finite weights -> this rank's own verdict: such a step is no skipped batch but
    # a blown-up model (reported as such by the skip stage, judged as a spike by the spike stage).
    started_nonfinite: dict[int, bool] = field(default_factory=dict)

    def judge(self, step: int, nonfinite: bool) -> None:
        """Record the verdict on the weights at the end of ``step``."""
        self.end_of_step = (step, nonfinite)

    def nonfinite_after(self, step: int) -> bool:
        """Whether the weights are known non-finite at the end of ``step`` (no read)."""
        return self.end_of_step == (step, True)

    def verdict(self, step: int) -> bool | None:
        """The verdict on the weights at the end of ``step``, or ``None`` when none was made."""
        if self.end_of_step is None or self.end_of_step[0] != step:
            return None
        return self.end_of_step[1]

    def forget(self) -> None:
        """Drop the latest verdict: a restore since then made it stale."""
        self.end_of_step = None
