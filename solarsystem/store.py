"""The orbit store: every object's osculating elements in one binary file.

``<paths.solar_system>/orbits.npz`` (uncompressed NumPy arrays, one per element, plus the
source file's name), written atomically by ``skydiff solarsystem ingest MPCORB.DAT``; the
per-night preparation (:mod:`solarsystem.night`) reads it whole.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from pipeline.core.exits import BadInputError
from pipeline.formats.atomic import atomic_path
from solarsystem.mpcorb import OrbitElements, read_mpcorb

__all__ = ["ORBIT_STORE_NAME", "orbit_store_path", "write_orbit_store", "read_orbit_store", "ingest_mpcorb"]

log = logging.getLogger("skydiff.solarsystem")

ORBIT_STORE_NAME = "orbits.npz"
_FIELDS = tuple(OrbitElements.__dataclass_fields__)


def orbit_store_path(root: str | os.PathLike) -> Path:
    """The orbit store file under a solar-system folder (``paths.solar_system``)."""
    return Path(root) / ORBIT_STORE_NAME


def write_orbit_store(elements: OrbitElements, path: str | os.PathLike, source: str = "") -> Path:
    """Write ``elements`` to the orbit store file ``path`` atomically."""
    path = Path(path)
    arrays = {name: np.asarray(getattr(elements, name)) for name in _FIELDS}
    arrays["designation"] = arrays["designation"].astype("U")
    meta = json.dumps({"source": source, "n_objects": len(elements), "written_utc": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, meta=np.array(meta), **arrays)
    return path


def read_orbit_store(path: str | os.PathLike) -> tuple[OrbitElements, dict]:
    """The elements and the metadata (``source``, ``n_objects``) of an orbit store.

    Raises
    ------
    BadInputError
        No orbit store at ``path`` (run ``skydiff solarsystem ingest``), or not one.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no orbit store (build it with `skydiff solarsystem ingest MPCORB.DAT`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            elements = OrbitElements(**{name: data[name] for name in _FIELDS})
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError) as exc:
        raise BadInputError(f"{path}: not an orbit store ({exc})") from None
    return elements, meta


def ingest_mpcorb(mpcorb_path: str | os.PathLike, root: str | os.PathLike) -> dict:
    """Build the orbit store under ``root`` from an MPCORB-format file (gzip or plain)."""
    t0 = time.perf_counter()
    elements = read_mpcorb(mpcorb_path)
    path = write_orbit_store(elements, orbit_store_path(root), source=str(mpcorb_path))
    epochs = np.asarray(elements.epoch_jd)
    summary = {"orbit_store": str(path), "n_objects": len(elements),
               "epoch_jd_min": float(epochs.min()), "epoch_jd_max": float(epochs.max()),
               "seconds": round(time.perf_counter() - t0, 2)}
    log.info("orbit store %s: %d objects from %s in %.1f s", path, len(elements), mpcorb_path, summary["seconds"])
    return summary
