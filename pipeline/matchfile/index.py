"""The footprint index of a matchfile root: which files cover a sky position.

``<root>/matchfile_index.json`` lists every matchfile (path relative to the root, its
field, ccdid, qid, fid) with its sky footprint: the centre of its reference sources and
their extent in the gnomonic (tangent-plane) coordinates about that centre.  A cone query
computes the position's tangent-plane coordinates about every centre at once and keeps the
files whose box, grown by the cone radius, holds it, so the light-curve reader opens only
the files that can contain the position (a box, not a circle: neighbouring quadrants
would otherwise overlap).

The index is updated when a matchfile is created (under ``<root>/.matchfile_index.lock``,
written through a temporary file and a rename), and can be rebuilt from the files' own
``footprint_*`` attributes by :func:`rebuild_index`.  Seeders on several nodes may lose each
other's entry where that ``flock`` does not hold across nodes; the fold step, which runs one
at a time, puts missing entries back (:func:`ensure_indexed`).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.matchfile.hjd import field_centre
from pipeline.formats.atomic import write_text_atomic
from pipeline.formats.locks import exclusive_lock
from pipeline.matchfile.layout import LayoutError

__all__ = ["Footprint", "footprint_of", "register_footprint", "FootprintIndex", "rebuild_index", "ensure_indexed",
           "INDEX_NAME"]

INDEX_NAME = "matchfile_index.json"
#: Slack added to every box (deg): positions measured on a later epoch may sit just outside.
BOX_MARGIN_DEG = 2.0 / 3600.0


@dataclass(frozen=True)
class Footprint:
    """Centre (deg) and tangent-plane box (deg) of a matchfile's sources."""

    ra: float
    dec: float
    xi_min: float
    xi_max: float
    eta_min: float
    eta_max: float


def _gnomonic(ra0, dec0, ra, dec):
    """Standard coordinates (deg) of (ra, dec) about centres (ra0, dec0); NaN on the far side."""
    ra0, dec0, ra, dec = (np.deg2rad(np.asarray(a, float)) for a in (ra0, dec0, ra, dec))
    dra = ra - ra0
    cos_c = np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(dra)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = np.cos(dec) * np.sin(dra) / cos_c
        eta = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(dra)) / cos_c
    far = cos_c <= 0.05          # beyond ~87 deg: cannot be inside a quadrant-sized box
    return np.where(far, np.nan, np.rad2deg(xi)), np.where(far, np.nan, np.rad2deg(eta))


def footprint_of(ra_deg, dec_deg) -> Footprint:
    """The footprint of a set of reference positions."""
    ra0, dec0 = field_centre(ra_deg, dec_deg)
    xi, eta = _gnomonic(ra0, dec0, ra_deg, dec_deg)
    return Footprint(ra0, dec0, float(np.nanmin(xi)) - BOX_MARGIN_DEG, float(np.nanmax(xi)) + BOX_MARGIN_DEG,
                     float(np.nanmin(eta)) - BOX_MARGIN_DEG, float(np.nanmax(eta)) + BOX_MARGIN_DEG)


@contextmanager
def _index_lock(root: Path):
    with exclusive_lock(root / ".matchfile_index.lock"):   # held for milliseconds: no timeout
        yield


def _write_entries(root: Path, entries: dict) -> None:
    write_text_atomic(json.dumps({"version": 1, "files": entries}, indent=1, sort_keys=True), root / INDEX_NAME,
                      durable=True)


def _read_entries(root: Path) -> dict:
    path = root / INDEX_NAME
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LayoutError(f"{path}: not a matchfile footprint index ({exc}); "
                          "rebuild it with pipeline.matchfile.index.rebuild_index") from None


def register_footprint(root: str | Path, path: str | Path, footprint: Footprint, keys: dict) -> None:
    """Add or update one matchfile's entry in the index of ``root``."""
    root = Path(root)
    relative = str(Path(path).resolve().relative_to(root.resolve()))
    with _index_lock(root):
        entries = _read_entries(root)
        entries[relative] = {**{k: int(v) for k, v in keys.items()}, **asdict(footprint)}
        _write_entries(root, entries)


def _entry_of(path: Path) -> dict:
    """A matchfile's index entry from its own attributes."""
    with h5py.File(path, "r", locking=False) as h5:
        attrs = h5.attrs
        return {**{k: int(attrs[k]) for k in ("field", "ccdid", "qid", "fid")},
                **{k: float(attrs[f"footprint_{k}"]) for k in Footprint.__dataclass_fields__}}


def rebuild_index(root: str | Path) -> int:
    """Rebuild the index from the ``*_match.h5`` files under ``root``; the number indexed."""
    root = Path(root)
    entries = {}
    for path in sorted(root.rglob("*_match.h5")):
        if not path.name.startswith("."):
            entries[str(path.relative_to(root))] = _entry_of(path)
    with _index_lock(root):
        _write_entries(root, entries)
    return len(entries)


def ensure_indexed(root: str | Path, paths) -> int:
    """Add to the index of ``root`` those of ``paths`` (matchfiles under it) it lacks; the number added.

    Writes the index only when something is missing, so a fold finding it complete (the
    usual case) does not race with seeders' updates at all.
    """
    root = Path(root)
    resolved = root.resolve()
    present = _read_entries(root)
    missing = {}
    for path in paths:
        try:
            relative = str(Path(path).resolve().relative_to(resolved))
        except ValueError:
            continue                     # not under this root
        if relative not in present:
            missing[relative] = _entry_of(Path(path))
    if missing:
        with _index_lock(root):
            entries = _read_entries(root)
            entries.update({k: v for k, v in missing.items() if k not in entries})
            _write_entries(root, entries)
    return len(missing)


class FootprintIndex:
    """The index of one root, reloaded when its file changes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._stamp = None
        self._paths: list[str] = []
        self._entries: list[dict] = []
        self._arrays = {k: np.zeros(0) for k in Footprint.__dataclass_fields__}

    def _refresh(self) -> None:
        try:
            st = os.stat(self.root / INDEX_NAME)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        entries = _read_entries(self.root) if stamp else {}
        self._paths = sorted(entries)
        self._entries = [entries[p] for p in self._paths]
        self._arrays = {k: np.array([e[k] for e in self._entries], dtype=float)
                        for k in Footprint.__dataclass_fields__}
        self._stamp = stamp

    def entries(self) -> list[tuple[Path, dict]]:
        """Every indexed file with its keys and footprint."""
        self._refresh()
        return [(self.root / p, e) for p, e in zip(self._paths, self._entries)]

    def files_covering(self, ra: float, dec: float, radius_deg: float) -> list[tuple[Path, dict]]:
        """The indexed files whose footprint, grown by ``radius_deg``, holds (ra, dec)."""
        self._refresh()
        if not self._paths:
            return []
        a = self._arrays
        xi, eta = _gnomonic(a["ra"], a["dec"], ra, dec)
        # A cone of angular radius r spans at least r in standard coordinates; 1 % slack
        # covers the gnomonic stretch over a quadrant-sized box.
        grow = 1.01 * radius_deg
        inside = ((xi >= a["xi_min"] - grow) & (xi <= a["xi_max"] + grow)
                  & (eta >= a["eta_min"] - grow) & (eta <= a["eta_max"] + grow))
        return [(self.root / self._paths[i], self._entries[i]) for i in np.flatnonzero(inside)]
