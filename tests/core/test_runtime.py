"""No network, private astropy directories, one log format."""
from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_non_loopback_connection_is_blocked():
    with pytest.raises(Exception) as info:
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    assert "Blocked" in type(info.value).__name__


def test_loopback_connection_is_allowed():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=2)
    conn, _ = server.accept()
    client.sendall(b"ok")
    assert conn.recv(2) == b"ok"
    for s in (client, conn, server):
        s.close()


def test_a_test_reaching_the_network_fails(pytester):
    """Run a test that opens a socket to a non-loopback address under the suite's own options."""
    addopts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    pytester.makepyfile(test_net="""
        import socket
        def test_reaches_out():
            socket.create_connection(("93.184.216.34", 80), timeout=1)
    """)
    result = pytester.runpytest_subprocess(*addopts.split(), "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*SocketConnectBlockedError*"])


def test_astropy_directories_are_private_to_each_process():
    code = "import pipeline, astropy.config as c; print(c.get_config_dir()); print(c.get_cache_dir())"
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    home_astropy = str(Path.home() / ".astropy")
    for out in outs:
        assert home_astropy not in out
    assert outs[0] != outs[1]


def test_astropy_downloads_are_off():
    from astropy.utils import data, iers
    assert iers.conf.auto_download is False
    assert data.conf.allow_internet is False


def test_log_format_is_shared(capsys):
    import logging
    from pipeline.core.runtime import LOG_FORMAT, setup_logging
    setup_logging()
    assert any(h.formatter and h.formatter._fmt == LOG_FORMAT for h in logging.getLogger().handlers)


class _Terminal:
    """A stream that says it is a terminal and keeps what was written."""

    def __init__(self):
        self.parts = []

    def isatty(self):
        return True

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass

    def screen(self) -> list[str]:
        """The lines a terminal would show: a carriage return + erase-line restarts the line."""
        lines = []
        for raw in "".join(self.parts).split("\n"):
            lines.append(raw.split("\r\x1b[K")[-1])
        return [line for line in lines if line]


def _log_from_worker(message: str) -> None:
    import logging
    logging.getLogger("skydiff.worker").warning(message)


def test_progress_bar_and_log_lines_never_share_a_line():
    """Log lines of this process and of pool workers erase the bar, take their own line, and
    the bar is drawn again below them (skydiff exposure's progress)."""
    import logging
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.core.runtime import LOG_FORMAT, progress_logging, worker_logging

    terminal = _Terminal()
    root = logging.getLogger()
    others = [h for h in root.handlers if getattr(h, "_skydiff", False)]
    for other in others:
        root.removeHandler(other)
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler._skydiff = True          # what setup_logging installs
    root.addHandler(handler)
    try:
        context = multiprocessing.get_context("fork")
        with progress_logging(terminal, context) as (bar, queue):
            bar.update("[##........] 1/5 quadrants")
            logging.getLogger("skydiff.test").warning("a line from the parent")
            with ProcessPoolExecutor(1, mp_context=context, initializer=worker_logging, initargs=(queue,)) as pool:
                pool.submit(_log_from_worker, "a line from a worker").result()
            bar.update("[####......] 2/5 quadrants")
    finally:
        root.removeHandler(handler)
        for other in others:
            root.addHandler(other)
    screen = terminal.screen()
    logs = [line for line in screen if "a line from" in line]
    assert len(logs) == 2 and all("quadrants" not in line for line in logs)
    assert all(line.split(" ", 2)[2].startswith("WARNING") for line in logs)     # LOG_FORMAT from column 0
    assert screen[-1] == "[####......] 2/5 quadrants"
    assert "a line from the parent\n[##........] 1/5 quadrants" in "".join(terminal.parts)   # redrawn below


def test_a_fresh_process_runs_a_command():
    """`import pipeline` no longer imports astropy: the command line must still set up logging
    and run in a fresh interpreter (astropy's logger is astropy's own)."""
    import os
    env = {**os.environ, "PYTHONPATH": str(REPO)}     # this tree, not an installed copy
    # A command that loads astropy after the logging set-up (the demo crashed so).
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "reference", "show", "missing-ref.fits"],
                            capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert result.returncode == 3, result.stderr
    assert "missing-ref.fits" in result.stderr and "Traceback" not in result.stderr
