"""Process-level hygiene: private astropy directories, no network, one log format.

ZTF saw a shared ``$HOME/.astropy`` corrupted by concurrent jobs, so every process gets
its own astropy configuration and cache directories.  Nothing may reach the network at
run time: IERS auto-download and remote data are switched off (astropy's bundled IERS
tables are used), and the observatory is a fixed location from the configuration.

:func:`configure_runtime` runs when :mod:`pipeline` is imported, before any astropy
import in the project, and is idempotent.  It does not import astropy itself (that took
most of a second, which every ``skydiff --help`` paid): the settings go into the private
configuration directory's ``astropy.cfg``, which astropy reads when it first loads them.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_configured = False

# One core per quadrant is the design (a Slurm task or a local worker each); threaded BLAS
# on a shared node made the prior's OLS ten times slower here.  Set before numpy loads;
# an explicit setting in the environment wins.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, os.environ.get("SKYDIFF_THREADS", "1"))


#: The astropy settings of every process (``astropy.cfg`` in its private configuration
#: directory): no IERS download (the bundled tables), IERS data never too old (astropy's
#: ``auto_max_age = None``, not expressible in the file; 1e9 days: no limit in effect), degraded accuracy a warning, no
#: internet for astropy.utils.data.
ASTROPY_CFG = """[utils.iers.iers]
auto_download = False
auto_max_age = 1e9
iers_degraded_accuracy = warn

[utils.data]
allow_internet = False
"""


def _private_astropy_dirs() -> Path:
    """Point XDG config/cache at a directory of this process's own.

    ``SKYDIFF_ASTROPY_DIR`` names a base (a Slurm task sets it to its job directory);
    otherwise a fresh temporary directory is made and removed at exit.
    """
    base_env = os.environ.get("SKYDIFF_ASTROPY_DIR")
    if base_env:
        base = Path(base_env) / f"astropy-{os.getpid()}"
        base.mkdir(parents=True, exist_ok=True)
    else:
        base = Path(tempfile.mkdtemp(prefix="skydiff-astropy-"))
        atexit.register(shutil.rmtree, base, ignore_errors=True)
    for kind in ("config", "cache"):
        (base / kind / "astropy").mkdir(parents=True, exist_ok=True)
    (base / "config" / "astropy" / "astropy.cfg").write_text(ASTROPY_CFG)
    os.environ["XDG_CONFIG_HOME"] = str(base / "config")
    os.environ["XDG_CACHE_HOME"] = str(base / "cache")
    return base


def configure_runtime() -> None:
    """Isolate astropy's directories and forbid its downloads (idempotent)."""
    global _configured
    if _configured:
        return
    if "astropy" not in sys.modules:
        # astropy reads the settings from the private directory's astropy.cfg when it loads.
        _private_astropy_dirs()
        # auto_max_age = None (what the file cannot say) also silences astropy's warning that
        # the bundled leap-second file is past its expiry; the bundled tables are the design.
        warnings.filterwarnings("ignore", message="leap-second file is expired")
        _configured = True
        return
    # astropy was imported first (e.g. by a notebook): use its temp-dir context and set the
    # values directly.
    from astropy.config import paths
    base = Path(tempfile.mkdtemp(prefix="skydiff-astropy-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    paths.set_temp_config(str(base)).__enter__()
    paths.set_temp_cache(str(base)).__enter__()
    from astropy.utils import data, iers

    iers.conf.auto_download = False
    iers.conf.auto_max_age = None
    iers.conf.iers_degraded_accuracy = "warn"
    data.conf.allow_internet = False
    _configured = True


def setup_logging(level: int | str = logging.INFO) -> None:
    """One log format for every command and job."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_skydiff", False)]
    if not ours:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._skydiff = True
        root.addHandler(handler)
    for handler in ours:
        # Standard error may have been replaced since the handler was made (a caller running
        # several commands in one process, a test harness): write to the current one, never
        # to a stream that may be closed.
        # (Not setStream: it flushes the old stream, which may be closed.)
        if isinstance(handler, logging.StreamHandler) and handler.stream is not sys.stderr:
            with handler.lock:
                handler.stream = sys.stderr
    root.setLevel(level)
    # Quiet library chatter that would drown the pipeline's own progress lines.  astropy must
    # create its own logger (an AstropyLogger) before anyone asks logging for "astropy".
    import astropy  # noqa: F401
    for noisy in ("matplotlib", "astropy", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class ProgressLine:
    """A progress bar on one line of a stream, which log lines never share.

    On a terminal the bar is redrawn in place (carriage return, erase line) and a log line
    first erases it, then is written on its own line, then the bar is drawn again below it.
    On anything else (a file, a pipe) each update is written as its own line.
    """

    def __init__(self, stream):
        self.stream = stream
        self.text = ""
        self.lock = threading.RLock()
        self.in_place = bool(getattr(stream, "isatty", lambda: False)())

    def update(self, text: str) -> None:
        with self.lock:
            self.text = text
            if self.in_place:
                self.stream.write("\r\x1b[K" + text)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        """Erase the bar (before a log line)."""
        if self.in_place and self.text:
            self.stream.write("\r\x1b[K")

    def redraw(self) -> None:
        if self.in_place and self.text:
            self.stream.write(self.text)
            self.stream.flush()

    def finish(self) -> None:
        """Leave the last state of the bar on its own line."""
        with self.lock:
            if self.in_place and self.text:
                self.stream.write("\n")
                self.stream.flush()
            self.text = ""


class _ProgressAwareHandler(logging.Handler):
    """Writes a record through ``target`` with the progress bar erased, then draws the bar again."""

    def __init__(self, target: logging.Handler, progress: ProgressLine):
        super().__init__(logging.NOTSET)
        self.target, self.progress = target, progress

    def emit(self, record: logging.LogRecord) -> None:
        with self.progress.lock:
            self.progress.clear()
            self.target.handle(record)
            self.progress.redraw()


def worker_logging(queue) -> None:
    """In a worker process: send every log record to ``queue`` (the parent writes them, so its
    progress bar and the workers' lines never share a line)."""
    from logging.handlers import QueueHandler
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(QueueHandler(queue))


@contextmanager
def progress_logging(stream, mp_context=None):
    """A :class:`ProgressLine` on ``stream`` for the block, and a queue for worker processes' logs.

    While the block runs, this process's skydiff log handler and every record a worker puts on
    the queue (:func:`worker_logging`) go through a handler that erases the bar, writes the
    line and redraws the bar. Yields ``(progress, queue)``.
    """
    import multiprocessing
    from logging.handlers import QueueListener

    progress = ProgressLine(stream)
    root = logging.getLogger()
    targets = [h for h in root.handlers if getattr(h, "_skydiff", False)]
    if not targets:
        target = logging.StreamHandler(sys.stderr)
        target.setFormatter(logging.Formatter(LOG_FORMAT))
        targets = [target]
    wrapped = [_ProgressAwareHandler(target, progress) for target in targets]
    queue = (mp_context or multiprocessing).Queue()
    listener = QueueListener(queue, *wrapped, respect_handler_level=False)
    for original, wrapper in zip(targets, wrapped):
        if original in root.handlers:
            root.removeHandler(original)
            root.addHandler(wrapper)
    listener.start()
    try:
        yield progress, queue
    finally:
        listener.stop()
        for original, wrapper in zip(targets, wrapped):
            if wrapper in root.handlers:
                root.removeHandler(wrapper)
                root.addHandler(original)
        progress.finish()
        queue.close()
