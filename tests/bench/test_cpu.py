"""The one CPU-pinning helper of the benchmarks."""
from __future__ import annotations

import os

import pytest

from pipeline.bench.cpu import least_busy_cpu, pinned_to_one_core

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this system")


def test_pinned_block_runs_on_one_allowed_core_and_restores_the_affinity():
    before = os.sched_getaffinity(0)
    with pinned_to_one_core() as cpu:
        assert cpu in before and os.sched_getaffinity(0) == {cpu}
        with pinned_to_one_core() as inner:       # nested: the outer core, no second look
            assert inner == cpu
        assert os.sched_getaffinity(0) == {cpu}
    assert os.sched_getaffinity(0) == before


def test_least_busy_cpu_is_one_of_the_allowed():
    assert least_busy_cpu({3}) == 3
    allowed = os.sched_getaffinity(0)
    assert least_busy_cpu(allowed, interval=0.05) in allowed
