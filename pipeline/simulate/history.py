"""Simulated surveys for the object history: quadrant images and their candidates over time.

:func:`survey_images` makes a small survey to associate image by image (the tests compare
stores on it): a patch of sky holding persistent sources, quadrant-sized images on several
overlapping pointings and epochs, each detecting most sources inside its footprint (scattered
by a fraction of an arcsecond) plus a few one-off transients.  Sources are at least 6 arcsec
apart and the scatter is well under 1.5 arcsec, so the true grouping of candidates into
objects does not depend on the order images are associated in.

:func:`survey_fill` makes a large survey's history as table rows, associated by construction,
for loading a store in bulk (``skydiff bench history``), and :func:`bench_images` the
200-candidate images then associated against it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from astropy.table import Table

from alerts.ids import make_candid, make_pid, object_id
from pipeline.simulate.alerts import square_footprint, synthetic_candidates, synthetic_context

__all__ = ["SurveyImage", "survey_images", "survey_fill", "bench_images", "FillSpec"]

_ARCSEC = 1.0 / 3600.0
QUADRANT_DEG = 0.86             # side of a quadrant-sized image (square_footprint's default)


@dataclass(frozen=True)
class SurveyImage:
    """One image of a simulated survey: its metadata and its candidates (table order)."""

    context: object               # alerts.packet.AlertContext
    candidates: Table
    source: np.ndarray            # index of the true source of each candidate (-1: a one-off transient)


def _sources(rng: np.random.Generator, n: int, ra0: float, dec0: float, width_deg: float, height_deg: float,
             min_sep_arcsec: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` positions in a box, on a jittered grid whose spacing keeps them ``min_sep_arcsec`` apart."""
    side = int(math.ceil(math.sqrt(n * width_deg / height_deg)))
    rows = int(math.ceil(n / side))
    step_x, step_y = width_deg / side, height_deg / rows
    jitter = max(0.0, min(step_x, step_y) - min_sep_arcsec * _ARCSEC) / 2.0
    ix, iy = np.meshgrid(np.arange(side), np.arange(rows))
    x = (ix.ravel()[:n] + 0.5) * step_x + rng.uniform(-jitter, jitter, n)
    y = (iy.ravel()[:n] + 0.5) * step_y + rng.uniform(-jitter, jitter, n)
    dec = dec0 - height_deg / 2 + y
    ra = ra0 + (x - width_deg / 2) / np.cos(np.radians(dec))
    return ra, dec


def survey_images(n_sources: int = 150, pointings: int = 2, epochs: tuple[float, ...] = (0.0, 1.0, 2.0, 5.0, 9.0, 45.0),
                  detect_fraction: float = 0.7, transients_per_image: int = 3, scatter_arcsec: float = 0.3,
                  ra0: float = 150.0, dec0: float = 2.0, jd0: float = 2461120.75, seed: int = 7) -> list[SurveyImage]:
    """A small survey: ``pointings`` quadrant images per epoch, overlapping by half a quadrant in RA.

    Parameters
    ----------
    n_sources : int
        Persistent sources spread over the pointings' union.
    pointings : int
        Image centres ``QUADRANT_DEG / 2`` apart in RA (each a field of its own).
    epochs : tuple of float
        Days after ``jd0``; pointing ``k`` of an epoch is taken ``k`` minutes after the first.
    detect_fraction : float
        Chance that an image detects a source inside its footprint.
    transients_per_image : int
        One-off candidates at new positions in each image.
    scatter_arcsec : float
        Rms position error of a detection per axis.

    Returns
    -------
    list of SurveyImage
        In time order.
    """
    rng = np.random.default_rng(seed)
    half = QUADRANT_DEG / 2
    centres = [ra0 + k * half / math.cos(math.radians(dec0)) for k in range(pointings)]
    width = QUADRANT_DEG * (pointings + 1) / 2
    src_ra, src_dec = _sources(rng, n_sources, (centres[0] + centres[-1]) / 2, dec0, width - 0.02, QUADRANT_DEG - 0.02)
    images = []
    for e, day in enumerate(epochs):
        for k, ra_c in enumerate(centres):
            expid = 302100000 + 1000 * e + k
            context = synthetic_context(expid=expid, rcid=21, jd=jd0 + day + k / 1440.0, ra=ra_c, dec=dec0,
                                        field=600 + k)
            cosd = math.cos(math.radians(dec0))
            inside = (np.abs((src_ra - ra_c) * cosd) < half - 0.005) & (np.abs(src_dec - dec0) < half - 0.005)
            chosen = np.flatnonzero(inside & (rng.random(n_sources) < detect_fraction))
            t_ra = ra_c + rng.uniform(-half + 0.01, half - 0.01, transients_per_image) / cosd
            t_dec = dec0 + rng.uniform(-half + 0.01, half - 0.01, transients_per_image)
            ra = np.concatenate([src_ra[chosen] + rng.normal(0, scatter_arcsec, len(chosen)) * _ARCSEC / cosd, t_ra])
            dec = np.concatenate([src_dec[chosen] + rng.normal(0, scatter_arcsec, len(chosen)) * _ARCSEC, t_dec])
            table = synthetic_candidates(len(ra), ra=ra_c, dec=dec0, seed=int(rng.integers(1 << 31)))
            table["ra"], table["dec"] = ra, dec
            table["ranr"], table["decnr"] = ra + 1e-5, dec + 1e-5
            images.append(SurveyImage(context, table, np.concatenate([chosen, np.full(transients_per_image, -1)])))
    return images


@dataclass(frozen=True)
class FillSpec:
    """The size of a survey loaded in bulk: objects, detections per object, candidates per image."""

    objects: int = 1_000_000
    detections_per_object: int = 10
    per_image: int = 200
    survey: str = "ztf"
    jd0: float = 2461000.5
    seed: int = 11

    @property
    def images(self) -> int:
        return int(math.ceil(self.objects / self.per_image)) * self.detections_per_object


def _tile_centres(n_tiles: int, dec_span: tuple[float, float] = (-20.0, 60.0)) -> tuple[np.ndarray, np.ndarray]:
    """Centres of ``n_tiles`` quadrant-sized tiles, row by row in declination, side by side in RA."""
    ras, decs = [], []
    dec = dec_span[0] + QUADRANT_DEG / 2
    while len(ras) < n_tiles:
        per_row = int(360.0 * math.cos(math.radians(dec)) / QUADRANT_DEG)
        for i in range(min(per_row, n_tiles - len(ras))):
            ras.append((i + 0.5) * 360.0 / per_row)
            decs.append(dec)
        dec += QUADRANT_DEG
    return np.asarray(ras), np.asarray(decs)


def _record(candid: int, pid: int, jd: float, ra: float, dec: float, mag: float, field: int, rcid: int) -> str:
    """A detection's ``prv_candidate`` JSON as the store keeps it (the fields a history reader uses)."""
    return json.dumps({"jd": jd, "fid": 2, "pid": pid, "diffmaglim": 20.6, "programid": 1, "candid": candid,
                       "isdiffpos": "t", "nid": pid // 10**9, "rcid": rcid, "field": field, "ra": ra, "dec": dec,
                       "magpsf": mag, "sigmapsf": 0.05, "rb": 0.9, "rbversion": "skydiff_rb1"})


def survey_fill(spec: FillSpec, object_cell, image_cells) -> Iterator[tuple[str, list[tuple]]]:
    """The rows of a large survey's history, tile by tile, as ``(table, rows)`` batches.

    The survey: ``spec.objects`` sources on quadrant-sized tiles (``spec.per_image`` per
    tile), each tile imaged ``spec.detections_per_object`` times (one epoch a night), every
    image detecting all its tile's sources.  ``object_cell(ra, dec)`` and
    ``image_cells(corners)`` are the store's HEALPix indexing (arrays of cells; a list).
    The last batch is the name counter.
    """
    rng = np.random.default_rng(spec.seed)
    n_tiles = int(math.ceil(spec.objects / spec.per_image))
    tile_ra, tile_dec = _tile_centres(n_tiles)
    serial = 0
    year = 2026
    for t in range(n_tiles):
        n = min(spec.per_image, spec.objects - t * spec.per_image)
        half = QUADRANT_DEG / 2 - 0.01
        cosd = math.cos(math.radians(tile_dec[t]))
        ra = tile_ra[t] + rng.uniform(-half, half, n) / cosd
        dec = tile_dec[t] + rng.uniform(-half, half, n)
        cells = object_cell(ra, dec)
        names = [object_id(spec.survey, year, serial + i) for i in range(n)]
        serial += n
        field, rcid = 1000 + t // 64, t % 64
        yield "objects", [(names[i], float(ra[i]), float(dec[i]), int(cells[i]), spec.jd0) for i in range(n)]
        corners = [list(c) for c in square_footprint(float(tile_ra[t]), float(tile_dec[t]))]
        detections, images, covered = [], [], []
        for e in range(spec.detections_per_object):
            jd = spec.jd0 + e + t * 1e-6
            expid = 100000000 + e * 100000 + t // 64
            pid = make_pid(expid, rcid)
            limit = {"jd": jd, "fid": 2, "pid": pid, "diffmaglim": 20.6, "programid": 1, "candid": None,
                     "rcid": rcid, "field": field}
            images.append((pid, jd, field, rcid, json.dumps(corners), json.dumps(limit), None))
            covered += [(c, pid) for c in image_cells(corners)]
            d_ra = ra + rng.normal(0, 0.2, n) * _ARCSEC / cosd
            d_dec = dec + rng.normal(0, 0.2, n) * _ARCSEC
            mags = rng.uniform(16, 20.5, n)
            for i in range(n):
                candid = make_candid(expid, rcid, i)
                detections.append((candid, names[i], pid, jd, float(d_ra[i]), float(d_dec[i]), int(cells[i]), field,
                                   rcid, _record(candid, pid, jd, float(d_ra[i]), float(d_dec[i]), float(mags[i]),
                                                 field, rcid), None))
        yield "images", images
        yield "image_cells", covered
        yield "detections", detections
    yield "id_counters", [(year, serial)]


def bench_images(spec: FillSpec, count: int, known_fraction: float = 0.7, seed: int = 5
                 ) -> Iterator[tuple[object, list[dict]]]:
    """``count`` new images for the association benchmark: ``(ImageRecord, detections)``.

    Each lands on a random tile of :func:`survey_fill`'s survey, a night after its last
    epoch, with ``spec.per_image`` candidates: ``known_fraction`` of them its known sources
    (re-detected within 0.2 arcsec rms), the rest new ones.
    """
    from alerts.history import ImageRecord

    rng = np.random.default_rng(seed)
    n_tiles = int(math.ceil(spec.objects / spec.per_image))
    tile_ra, tile_dec = _tile_centres(n_tiles)
    fill = np.random.default_rng(spec.seed)
    # Replay the fill's draws for the tile positions (uniform per tile, in tile order).
    tiles = rng.choice(n_tiles, size=count, replace=count > n_tiles)
    wanted = {int(t) for t in tiles}
    positions = {}
    for t in range(max(wanted) + 1):
        n = min(spec.per_image, spec.objects - t * spec.per_image)
        half = QUADRANT_DEG / 2 - 0.01
        cosd = math.cos(math.radians(tile_dec[t]))
        ra = tile_ra[t] + fill.uniform(-half, half, n) / cosd
        dec = tile_dec[t] + fill.uniform(-half, half, n)
        for _ in range(spec.detections_per_object):      # the fill's per-epoch draws
            fill.normal(0, 0.2, n), fill.normal(0, 0.2, n), fill.uniform(16, 20.5, n)
        if t in wanted:
            positions[t] = (ra, dec)
    for k, t in enumerate(tiles):
        t = int(t)
        ra, dec = positions[t]
        cosd = math.cos(math.radians(tile_dec[t]))
        n_known = int(round(known_fraction * spec.per_image))
        pick = rng.choice(len(ra), size=min(n_known, len(ra)), replace=False)
        half = QUADRANT_DEG / 2 - 0.01
        n_new = spec.per_image - len(pick)
        c_ra = np.concatenate([ra[pick] + rng.normal(0, 0.2, len(pick)) * _ARCSEC / cosd,
                               tile_ra[t] + rng.uniform(-half, half, n_new) / cosd])
        c_dec = np.concatenate([dec[pick] + rng.normal(0, 0.2, len(pick)) * _ARCSEC,
                                tile_dec[t] + rng.uniform(-half, half, n_new)])
        expid = 200000000 + k
        field, rcid = 1000 + t // 64, t % 64
        pid = make_pid(expid, rcid)
        jd = spec.jd0 + spec.detections_per_object + 1 + k * 1e-5
        limit = {"jd": jd, "fid": 2, "pid": pid, "diffmaglim": 20.6, "programid": 1, "candid": None,
                 "rcid": rcid, "field": field}
        image = ImageRecord(pid=pid, jd=jd, field=field, rcid=rcid,
                            footprint=square_footprint(float(tile_ra[t]), float(tile_dec[t])), upper_limit=limit)
        detections = [json.loads(_record(make_candid(expid, rcid, i), pid, jd, float(c_ra[i]), float(c_dec[i]),
                                         18.0, field, rcid)) for i in range(len(c_ra))]
        yield image, detections
