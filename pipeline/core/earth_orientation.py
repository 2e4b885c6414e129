"""astropy's bundled Earth-orientation table (IERS-A), parsed once per machine and user.

Every transformation to the observed frame (the horizon check of a quadrant's pointing,
the airmass of the astrometric scale check, the barycentric times of the matchfile) needs
UT1 - UTC and the polar motion, which astropy takes from its bundled IERS-A text file
(20,000 rows, no download: :mod:`pipeline.core.runtime`).  Parsing it took 0.4 s of every
quadrant task on this machine, idle, before its alerts.  The parsed table is kept as a FITS
table in a per-user cache directory, named after the bundled file's version, size and
time, so a later process reads it back in 0.04 s: the same table (the values come back bit
for bit), not an approximation.  A cache that cannot be written or read is passed over:
astropy then parses the text as it always did.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

__all__ = ["earth_orientation_cache_dir", "install_earth_orientation_table"]

log = logging.getLogger("skydiff.runtime")

_installed: str | None = None


def earth_orientation_cache_dir() -> Path:
    """The cache directory: ``SKYDIFF_CACHE_DIR``, else ``skydiff-<uid>`` in the temporary
    folder (astropy's own cache is private to each process, see :mod:`pipeline.core.runtime`)."""
    named = os.environ.get("SKYDIFF_CACHE_DIR")
    return Path(named) if named else Path(tempfile.gettempdir()) / f"skydiff-{os.getuid()}"


def _own_directory(folder: Path) -> bool:
    """Make ``folder`` (mode 0700) if missing; True if it is a directory of this user's alone,
    so that no one else can have put a table there."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = folder.stat()
    except OSError:
        return False
    return folder.is_dir() and status.st_uid == os.getuid() and not status.st_mode & 0o022


def install_earth_orientation_table(cache_dir: str | os.PathLike | None = None) -> str:
    """Give astropy its IERS-A table from the cache, or parse it and fill the cache.

    Idempotent within a process.

    Returns
    -------
    str
        ``"cache"`` (read from the cache), ``"parsed"`` (parsed, and cached when possible),
        ``"local file"`` (a ``finals2000A.all`` in the working directory, which astropy
        prefers to its bundled one: parsed, never cached) or, on a later call,
        what the first call did.
    """
    global _installed
    if _installed is not None:
        return _installed
    import astropy
    from astropy.table import QTable
    from astropy.utils import iers

    bundled = Path(iers.IERS_A_FILE)
    if (Path.cwd() / bundled.name).exists():
        iers.earth_orientation_table.set(iers.IERS_Auto.open())
        _installed = "local file"
        return _installed
    folder = Path(cache_dir) if cache_dir is not None else earth_orientation_cache_dir()
    usable = _own_directory(folder)
    status = bundled.stat()
    cache = folder / f"iers-a-astropy{astropy.__version__}-{status.st_size}-{int(status.st_mtime)}.fits"
    table, source = None, "parsed"
    if usable and cache.exists():
        try:
            table, source = iers.IERS_Auto(QTable.read(cache)), "cache"
        except Exception as exc:          # a damaged cache is parsed again and replaced
            log.debug("earth orientation cache %s unreadable (%s): parsing %s", cache, exc, bundled)
    if table is None:
        table = iers.IERS_Auto.open()
        if usable:
            from pipeline.formats.atomic import atomic_path
            try:
                with atomic_path(cache) as temporary, warnings.catch_warnings():
                    # the table's metadata keys are longer than FITS keywords: HIERARCH cards
                    warnings.simplefilter("ignore")
                    table.write(temporary, format="fits", overwrite=True)
            except OSError as exc:
                log.debug("earth orientation cache %s not written: %s", cache, exc)
    iers.earth_orientation_table.set(table)
    _installed = source
    return source
