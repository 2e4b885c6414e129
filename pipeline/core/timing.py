"""Seconds per stage, as every stage and orchestrator records them (``timings`` dicts)."""
from __future__ import annotations

import time

__all__ = ["StageClock"]


class StageClock:
    """Laps of a running clock, added into a ``timings`` dict by stage name.

    Parameters
    ----------
    timings : dict, optional
        Where the laps go (seconds, added to what a stage already has); a new dict if None.
    """

    def __init__(self, timings: dict[str, float] | None = None):
        self.timings = {} if timings is None else timings
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Charge the time since the last lap (or the start) to ``stage``."""
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.t
        self.t = now
