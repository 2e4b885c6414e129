"""The MPC's MPCORB format: one minor planet per fixed-column line.

Columns (1-based, the MPC's published layout): 1-7 packed
designation, 9-13 H, 15-19 G, 21-25 packed epoch (TT), 27-35 mean anomaly, 38-46 argument of
perihelion, 49-57 longitude of the ascending node, 60-68 inclination (degrees, J2000
ecliptic), 70-79 eccentricity, 81-91 mean daily motion (deg/day), 93-103 semimajor axis
(au), ..., 167-194 readable designation.  The full ``MPCORB.DAT`` starts with a header
that ends at a line of dashes; blank lines separate groups.

Parsing goes through skyfield's reader (:func:`skyfield.data.mpc.load_mpcorb_dataframe`);
the packed designations and epochs are decoded here (skyfield decodes epochs one row at a
time, far too slow for 1.4 million rows).
"""
from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.exits import BadInputError

__all__ = ["OrbitElements", "read_mpcorb", "write_mpcorb", "format_mpcorb_lines", "pack_designation",
           "unpack_designation", "pack_epoch", "unpack_epoch_jd", "ssnamenr_of"]

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CENTURY = {"I": 1800, "J": 1900, "K": 2000, "L": 2100}


@dataclass(frozen=True)
class OrbitElements:
    """Osculating heliocentric elements of many objects (J2000 ecliptic, angles in degrees).

    ``designation`` is the unpacked name (``"97125"`` for a numbered object, its number;
    ``"2019 VG102"`` for a provisional one); ``epoch_jd`` is a TT Julian date.
    """

    designation: np.ndarray
    H: np.ndarray
    G: np.ndarray
    epoch_jd: np.ndarray
    mean_anomaly_deg: np.ndarray
    peri_deg: np.ndarray
    node_deg: np.ndarray
    incl_deg: np.ndarray
    e: np.ndarray
    a_au: np.ndarray

    def __len__(self) -> int:
        return len(self.designation)

    def take(self, rows) -> "OrbitElements":
        return OrbitElements(**{k: np.asarray(getattr(self, k))[rows] for k in self.__dataclass_fields__})


def _b62(c: str) -> int:
    return _BASE62.index(c)


def pack_designation(name: str) -> str:
    """The MPC's packed form of a number (``"97125"``) or provisional designation
    (``"2019 VG102"``)."""
    name = name.strip()
    if name.isdigit():
        n = int(name)
        if n < 100000:
            return f"{n:05d}"
        if n < 620000:
            return _BASE62[n // 10000] + f"{n % 10000:04d}"
        n -= 620000
        digits = ""
        for _ in range(4):
            digits = _BASE62[n % 62] + digits
            n //= 62
        return "~" + digits
    year, rest = name.split()
    century = {v: k for k, v in _CENTURY.items()}[int(year) // 100 * 100]
    half_month, second, cycle = rest[0], rest[1], int(rest[2:] or 0)
    cycle_code = (_BASE62[cycle // 10] + str(cycle % 10)) if cycle >= 100 else f"{cycle:02d}"
    return f"{century}{year[2:]}{half_month}{cycle_code}{second}"


def unpack_designation(packed: str) -> str:
    """Inverse of :func:`pack_designation`."""
    p = packed.strip()
    if p.startswith("~"):
        n = 0
        for c in p[1:5]:
            n = 62 * n + _b62(c)
        return str(n + 620000)
    if len(p) == 5:
        return str(_b62(p[0]) * 10000 + int(p[1:]))
    year = _CENTURY[p[0]] + int(p[1:3])
    cycle = _b62(p[4]) * 10 + int(p[5])
    return f"{year} {p[3]}{p[6]}{cycle if cycle else ''}"


def ssnamenr_of(designation: str) -> str:
    """The name ZTF writes in ``ssnamenr``: the number of a numbered object, the provisional
    designation without its space otherwise."""
    return designation.replace(" ", "")


def pack_epoch(jd_tt: float) -> str:
    """Packed epoch (``K2431``) of a Julian date at 0h TT (MPCORB epochs are whole days)."""
    from astropy.time import Time
    ymd = Time(jd_tt, format="jd", scale="tt").ymdhms
    y, m, d = ymd["year"], ymd["month"], ymd["day"]
    return f"{_BASE62[int(y) // 100]}{int(y) % 100:02d}{_BASE62[int(m)]}{_BASE62[int(d)]}"


def unpack_epoch_jd(packed: np.ndarray) -> np.ndarray:
    """TT Julian dates of packed epochs (vectorised over the distinct values)."""
    from astropy.time import Time
    packed = np.asarray(packed, dtype=str)
    values, inverse = np.unique(packed, return_inverse=True)
    isot = [f"{_b62(p[0]) * 100 + int(p[1:3]):04d}-{_b62(p[3]):02d}-{_b62(p[4]):02d}" for p in values]
    jd = Time(isot, format="iso", scale="tt").jd if isot else np.zeros(0)
    return np.asarray(jd, dtype=float)[inverse]


def _data_lines(raw: bytes, source: str) -> bytes:
    """The orbit lines of an MPCORB file: after the header's line of dashes (if any),
    blank lines dropped."""
    lines = raw.splitlines()
    for k, line in enumerate(lines[:200]):
        if line.startswith(b"-----"):
            lines = lines[k + 1:]
            break
    lines = [line for line in lines if len(line.strip()) > 0]
    short = [k for k, line in enumerate(lines) if len(line) < 103]
    if short:
        raise BadInputError(f"{source}: line {short[0] + 1} of the orbit records has {len(lines[short[0]])} "
                            "characters, fewer than MPCORB's 103 up to the semimajor axis")
    return b"\n".join(lines) + b"\n"


def read_mpcorb(path: str | os.PathLike) -> OrbitElements:
    """Read an MPCORB-format file (plain or gzip).

    Raises
    ------
    BadInputError
        The file is missing, empty or not in the MPCORB format (the message names it).
    """
    from skyfield.data.mpc import load_mpcorb_dataframe
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read the MPCORB file ({exc})") from None
    data = _data_lines(raw, str(path))
    if data.strip() == b"":
        raise BadInputError(f"{path}: no orbit records")
    try:
        df = load_mpcorb_dataframe(io.BytesIO(data))
        packed = df["designation_packed"].astype(str).to_numpy()
        designation = np.array([unpack_designation(p) for p in packed])
        elements = OrbitElements(
            designation=designation,
            H=df["magnitude_H"].to_numpy(dtype=float), G=df["magnitude_G"].to_numpy(dtype=float),
            epoch_jd=unpack_epoch_jd(df["epoch_packed"].astype(str).to_numpy()),
            mean_anomaly_deg=df["mean_anomaly_degrees"].to_numpy(dtype=float),
            peri_deg=df["argument_of_perihelion_degrees"].to_numpy(dtype=float),
            node_deg=df["longitude_of_ascending_node_degrees"].to_numpy(dtype=float),
            incl_deg=df["inclination_degrees"].to_numpy(dtype=float),
            e=df["eccentricity"].to_numpy(dtype=float), a_au=df["semimajor_axis_au"].to_numpy(dtype=float))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BadInputError(f"{path}: not an MPCORB-format file ({exc})") from None
    # Objects without a magnitude have a blank H; MPC's convention for G when blank is 0.15.
    G = np.where(np.isfinite(elements.G), elements.G, 0.15)
    bad = ~(np.isfinite(elements.a_au) & np.isfinite(elements.e) & (elements.e < 1) & (elements.a_au > 0))
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise BadInputError(f"{path}: orbit record {k + 1} ({designation[k]}) has no elliptic orbit "
                            f"(a={elements.a_au[k]}, e={elements.e[k]})")
    return OrbitElements(**{**elements.__dict__, "G": G})


def format_mpcorb_lines(elements: OrbitElements) -> list[str]:
    """MPCORB lines (202 characters) of ``elements``; columns past the semimajor axis carry
    neutral values (uncertainty 0, no reference or arc information)."""
    n_per_day = np.degrees(np.sqrt(0.01720209895 ** 2 / elements.a_au ** 3))
    epochs = {jd: pack_epoch(jd) for jd in np.unique(elements.epoch_jd)}
    lines = []
    for k in range(len(elements)):
        designation = str(elements.designation[k])
        readable = f"({designation})" if designation.isdigit() else designation
        h = f"{elements.H[k]:5.2f}" if np.isfinite(elements.H[k]) else " " * 5
        line = (f"{pack_designation(designation):<7s} {h} {elements.G[k]:5.2f} {epochs[elements.epoch_jd[k]]} "
                f"{elements.mean_anomaly_deg[k] % 360:9.5f}  {elements.peri_deg[k] % 360:9.5f}  "
                f"{elements.node_deg[k] % 360:9.5f}  {elements.incl_deg[k]:9.5f}  {elements.e[k]:9.7f} "
                f"{n_per_day[k]:11.8f} {elements.a_au[k]:11.7f}  0 {'skydiff':9s} {10:5d} {1:3d} "
                f"{'2020-2026':9s} {0.5:4.2f} M-v 3Ek {'skydiff':10s} {'0000':4s} {readable:28s}20260101")
        lines.append(line)
    return lines


def write_mpcorb(elements: OrbitElements, path: str | os.PathLike) -> Path:
    """Write ``elements`` as an MPCORB file (gzip when the name ends in ``.gz``), atomically."""
    from pipeline.formats.atomic import atomic_path
    path = Path(path)
    text = ("skydiff MPCORB-format orbits\n" + "-" * 160 + "\n"
            + "\n".join(format_mpcorb_lines(elements)) + "\n").encode("ascii")
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(text, compresslevel=1) if path.name.endswith(".gz") else text)
    return path
