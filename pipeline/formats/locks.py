"""The one inter-process lock: an exclusive ``flock`` on a lock file, with a timeout.

Writers of shared files (matchfile folds, the catalogue stores' index, the solar-system night
files) serialise on a ``<name>.lock`` beside what they write.  ``flock`` is dependable among
the processes of one machine, not across the clients of every shared file system, so the
matchfiles rest no correctness on it (see :mod:`pipeline.matchfile.store`).  ``flock`` locks belong to the
open file description, so they are released when the holder exits or is killed -- a crashed
writer never leaves a stale lock.  The holder writes ``pid N on HOST`` into the lock file so
that a waiter that gives up can say who held it.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["LockTimeout", "exclusive_lock"]


class LockTimeout(TimeoutError):
    """The lock stayed held by another process for the whole timeout (``holder`` says who)."""

    def __init__(self, lock_path: Path, timeout_s: float, holder: str):
        super().__init__(f"{lock_path}: held by {holder} for more than {timeout_s:g} s")
        self.lock_path, self.timeout_s, self.holder = lock_path, timeout_s, holder


@contextmanager
def exclusive_lock(lock_path: str | os.PathLike, timeout_s: float | None = None,
                   poll_s: float = 0.02) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created with its folder if missing).

    Parameters
    ----------
    lock_path : path-like
        The lock file.
    timeout_s : float, optional
        Give up after this long with :class:`LockTimeout`; None waits as long as it takes.
    poll_s : float
        Interval between attempts while waiting with a timeout.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        if timeout_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                        raise LockTimeout(lock_path, timeout_s, holder) from None
                    time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)   # closing the descriptor releases the flock
