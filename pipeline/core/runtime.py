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
import warnings
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
    if not any(getattr(h, "_skydiff", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._skydiff = True
        root.addHandler(handler)
    root.setLevel(level)
    # Quiet library chatter that would drown the pipeline's own progress lines.
    for noisy in ("matplotlib", "astropy", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
