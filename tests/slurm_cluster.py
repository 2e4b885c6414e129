"""The real Slurm cluster of ``slurm/local-slurm.sh`` for tests: a controller on this host and
two compute nodes, each in its own network namespace with its own address.

:func:`start_local_slurm` starts it (installing Debian's packages when missing) unless it is
already up; :meth:`LocalSlurm.stop` stops it at the end only if it started it.  It skips the
test, with the reason, only when Slurm truly cannot be had here: not root, or the packages
cannot be installed.  Ports 6817/6818 are fixed, so there is one such Slurm per machine.
Tasks run on the nodes and reach this host's services only at :attr:`LocalSlurm.host_address`
(the bridge), never at 127.0.0.1: servers the tasks use must listen there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "local-slurm.sh"
START_TIMEOUT_S = 420        # a first start may install packages (~15 s, longer behind an apt lock)


def _script(action: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=timeout_s)


class LocalSlurm:
    """A running test cluster; ``jobcomp`` is its job completion file, ``host_address`` where
    its nodes reach this host, ``nodes`` their names."""

    def __init__(self, started_here: bool):
        self.started_here = started_here
        state = os.environ.get("SKYDIFF_SLURM_STATE", "/var/lib/skydiff-slurm")
        self.jobcomp = Path(state) / "jobcomp.txt"
        self.host_address = _script("address", 10).stdout.strip()
        self.nodes = [f"skydiff-n{k}" for k in range(1, int(os.environ.get("SKYDIFF_SLURM_NODES", "2")) + 1)]

    def stop(self) -> None:
        if self.started_here:
            _script("stop")


def start_local_slurm() -> LocalSlurm:
    """Start (or reuse) the local Slurm; skip when it cannot run on this machine."""
    if _script("status", 30).returncode == 0:
        return LocalSlurm(started_here=False)
    if os.geteuid() != 0:
        pytest.skip("the one-machine Slurm needs root (slurm/local-slurm.sh start)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    proc = _script("start", START_TIMEOUT_S)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        if shutil.which("slurmctld") is None:
            pytest.skip(f"Slurm's Debian packages could not be installed: {message}")
        raise RuntimeError(f"local Slurm did not start: {message}")
    return LocalSlurm(started_here=True)
