"""Pinning a benchmark to one CPU core, so that its figures are those of "one core of this machine".

The machine is shared (tests, other benchmarks, a broker), so :func:`pinned_to_one_core`
takes the allowed core that was idlest over a short look at ``/proc/stat``, pins the
process to it for the block and restores the previous affinity afterwards.  Benchmarks
only: production sizes its process pools from the affinity and never pins.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterable, Iterator

__all__ = ["least_busy_cpu", "pinned_to_one_core", "unpin"]


def least_busy_cpu(allowed: Iterable[int], interval: float = 0.5) -> int:
    """The allowed CPU with the most idle time over ``interval`` seconds (from ``/proc/stat``)."""
    allowed = sorted(allowed)
    if len(allowed) == 1:
        return allowed[0]

    def idle_times() -> dict[int, int]:
        idle = {}
        try:
            with open("/proc/stat") as stat:
                for line in stat:
                    name, *fields = line.split()
                    if name.startswith("cpu") and name[3:].isdigit():
                        idle[int(name[3:])] = int(fields[3]) + int(fields[4])   # idle + iowait
        except OSError:
            pass
        return idle
    before = idle_times()
    time.sleep(interval)
    after = idle_times()
    candidates = [c for c in allowed if c in before and c in after]
    if not candidates:
        return allowed[0]
    return max(candidates, key=lambda c: after[c] - before[c])


@contextlib.contextmanager
def pinned_to_one_core() -> Iterator[int | None]:
    """Run the block on the idlest allowed core; yields that core, or None where pinning is unavailable.

    The previous affinity is restored when the block ends, so nested use keeps the outer core.
    """
    try:
        original = os.sched_getaffinity(0)
        cpu = least_busy_cpu(original)
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        original = cpu = None
    if cpu is None:
        yield None
        return
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, original)


def unpin() -> None:
    """Allow every CPU again (in a child process that stands for another machine, e.g. a broker)."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
