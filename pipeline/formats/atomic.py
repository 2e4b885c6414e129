"""Atomic file writes: a reader sees the old file or the complete new one, never a part.

Every product, record and catalogue the pipeline writes goes through :func:`atomic_path`:
the content is written to a temporary file in the target's own folder (a rename is atomic
only within one file system), which is renamed over the target once complete and removed
if anything fails.  The temporary name is hidden and recognisable,
``.<name>.tmp-<random>``, so watchers skip it and a writer may clear what a killed
process left behind.

Each writer takes the content first and the path second, as ``json.dump`` does.

Durability is the caller's choice.  By default the rename is atomic but not synced: a
process crash never leaves a partial file, and a power cut may lose the newest version.
``durable=True`` also syncs the file before the rename and its folder after it, so the file
is on disk when the call returns (the matchfiles and their index need this; the alert
spool makes groups of packets durable itself, with :func:`fsync_directory`).

Files get the permissions of an ordinary new file (``0o666`` less the umask), products
being shared; ``mode`` sets others (``0o600`` for a file holding a password: the file is
private from its creation on).  The mode is given when the temporary file is created, so
the process umask is never changed (changing it would race with other threads).
"""
from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic",
           "write_fits_atomic", "write_table_atomic", "fsync_file", "fsync_directory", "TEMPORARY_MARK"]

#: What every temporary name holds after the target's name: ``.<name>.tmp-<random>``.
TEMPORARY_MARK = ".tmp-"


def _create_temporary(path: Path, mode: int) -> Path:
    """A new empty file ``.<name>.tmp-<random>`` beside ``path``, created with ``mode`` (less the umask)."""
    while True:
        temporary = path.with_name(f".{path.name}{TEMPORARY_MARK}{secrets.token_hex(6)}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            return temporary
        except FileExistsError:
            continue


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data and metadata to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a folder's entries to disk, so that a file created or renamed in it stays."""
    fsync_file(directory)


@contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block ends, rename it to ``path``.

    The block writes the whole content to the yielded path (any writer that takes a file
    name).  The target's folder is created if missing.  If the block raises, the temporary
    file is removed and ``path`` is left as it was.

    Parameters
    ----------
    path : str or Path
        The file to write.
    durable : bool
        Sync the file before the rename and the folder after it.
    mode : int
        Permission bits of the new file, less the umask (writers truncate the file they are
        given, which keeps its bits).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(path, mode)
    try:
        yield temporary
        if durable:
            fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)


def write_text_atomic(text: str, path: str | os.PathLike, *, encoding: str = "utf-8", durable: bool = False,
                      mode: int = 0o666) -> Path:
    """Write ``text`` to ``path`` atomically, with ``\\n`` line ends on every platform."""
    with atomic_path(path, durable=durable, mode=mode) as temporary:
        with open(temporary, "w", encoding=encoding, newline="\n") as stream:
            stream.write(text)
    return Path(path)


def write_json_atomic(record: Any, path: str | os.PathLike, *, indent: int = 2, sort_keys: bool = False,
                      newline: bool = True, durable: bool = False) -> Path:
    """Write ``record`` as JSON atomically; ``newline`` ends the file with one."""
    text = json.dumps(record, indent=indent, sort_keys=sort_keys) + ("\n" if newline else "")
    return write_text_atomic(text, path, durable=durable)


def write_fits_atomic(hdul, path: str | os.PathLike, finalize: Callable[[Path], None] | None = None,
                      *, durable: bool = False) -> Path:
    """Write an astropy ``HDUList`` atomically.

    ``finalize(temporary_path)``, when given, may patch the written file before the rename.
    """
    with atomic_path(path, durable=durable) as temporary:
        hdul.writeto(temporary, overwrite=True)
        if finalize is not None:
            finalize(temporary)
    return Path(path)


def write_table_atomic(table, path: str | os.PathLike, *, durable: bool = False) -> Path:
    """Write an astropy ``Table`` atomically: ECSV for a ``.ecsv`` name, else a FITS binary table."""
    if Path(path).suffix == ".ecsv":
        with atomic_path(path, durable=durable) as temporary:
            table.write(temporary, format="ascii.ecsv", overwrite=True)
        return Path(path)
    from astropy.io import fits
    return write_fits_atomic(fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)]), path, durable=durable)
