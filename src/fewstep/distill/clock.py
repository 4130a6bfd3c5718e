"""The wall-clock time a distillation run has trained, kept across resumes and written into every checkpoint.

The Trainer does not record its own time; a distillation objective ticks this clock in `begin_step` and `after_step`
(the time between two ticks of one process, so checkpoints and figures written between steps count, while a pause
between a run and its resume does not) and stores the total under extra["train_seconds"] of each checkpoint (the
student's training time that `fewstep bench distill` reports) and under extra["objective"]["seconds"] to resume.
"""

from __future__ import annotations

import time
from typing import Any

from ..train.checkpoint import CheckpointError

SECONDS_KEY = "train_seconds"


class TrainClock:
    """Seconds of training so far: `tick()` at each step boundary adds the time since the previous tick."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._last: float | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds += now - self._last
        self._last = now

    def state(self) -> dict[str, Any]:
        return {"seconds": self.seconds}

    def load(self, values: dict[str, Any], where: str) -> None:
        """Continue from a checkpoint's extra["objective"] (0 where it holds no time, e.g. an older checkpoint)."""
        seconds = values.get("seconds", 0.0)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise CheckpointError(f"{where}: key 'extra.objective.seconds' must be a number >= 0, got {seconds!r}")
        self.seconds, self._last = float(seconds), None

    def extra(self) -> dict[str, float]:
        return {SECONDS_KEY: round(self.seconds, 1)}
