r"""SExtractor's CLEAN of spurious detections, over neighbour pairs instead of all pairs.

A bright source's wings, thresholded and deblended, leave detections that are no sources
of their own.  SExtractor's CLEAN (``clean.c``; sep's ``clean()`` in ``extract.c``) models
each detection's light as a Moffat-like profile reaching down from its mean surface
brightness,

.. math:: I(r) = A \left(1 + \alpha\, q(r)\right)^{-\beta},\qquad
          A = \frac{F}{2\pi a b\, c_{ab}},\qquad
          \alpha = \left(\left(A/t\right)^{1/\beta} - 1\right)\frac{\pi a b}{N_\mathrm{pix}},

(:math:`q` the detection's ``CXX, CYY, CXY`` ellipse, :math:`t` its detection threshold,
:math:`c_{ab}` the isophotal area correction of ``analyse()``) and removes a fainter
detection within ten times the two objects' summed semi-major axes when the brighter one's
profile at its position exceeds its ``mthresh``, the level of its ``minarea``-th brightest
filtered pixel above the threshold.  The objects are taken in sep's catalogue order, and
an object already removed eats nothing more.

sep does this for every pair of detections, ``O(N^2)``: on a Galactic-plane quadrant
(34,000 detections) it was half of ``sep.extract``'s time (2.0 of 3.9 s).  No library
offers the step apart from the extraction, so it is written here: ``sep.extract`` runs with
``clean=False`` and this module finds the pairs within reach with a k-d tree, evaluates
them vectorised in sep's own single- and double-precision arithmetic, and walks, in sep's
order, only the few pairs in which one object can eat the other (tens on a crowded
quadrant), so the result is the same sequence of decisions.

sep's ``mthresh`` comes from a heap over the object's pixel list that skips the
``minarea + 1``-th pixel listed and, for an object of exactly ``minarea`` pixels, keeps the
first pixel listed rather than the faintest.  sep lists pixels in the order its scan merged
them, which the segmentation map does not keep; here they are taken in raster order, which
is that order for most objects.  (SExtractor's own definition, the ``minarea``-th brightest
of all pixels, kept 70 detections sep removes on a simulated Galactic-plane quadrant, none of
them on a true source, so sep's quirk is kept.)  Against sep's cleaning, on the simulated
quadrants: 4 of 13,909 detections differ at mid-latitude (removed here, kept by sep) and 21
of 33,485 in the plane (15 removed here, 6 kept here), none of them on a true source; on the
small, fainter synthetic field of ``tests/measure/test_cleaning.py``, 13 of 1,272, all faint.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from pipeline.measure._kernels import segment_statistics

__all__ = ["CLEAN_ZONE", "DEFAULT_FILTER", "clean_detections", "clean_survivors"]

#: Reach of the test, in units of the two objects' summed semi-major axes (SExtractor's).
CLEAN_ZONE = 10.0

#: sep's default detection filter (the one ``sep.extract`` uses without ``filter_kernel``).
DEFAULT_FILTER = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=np.float32)


def clean_detections(objects: np.ndarray, segmap: np.ndarray, image: np.ndarray, rms: np.ndarray,
                     thresh: float, minarea: int) -> tuple[np.ndarray, np.ndarray]:
    """sep's catalogue and segmentation map after SExtractor's CLEAN, as ``sep.extract(...,
    clean=True)`` returns them: the survivors in order, labelled ``1..n`` (the map is changed
    in place).  Arguments as for :func:`clean_survivors`."""
    flat = segmap.ravel()
    pixels = np.flatnonzero(flat)
    survives = clean_survivors(objects, segmap, image, rms, thresh, minarea, pixels=pixels)
    if survives.all():
        return objects, segmap
    relabel = np.zeros(len(survives) + 1, dtype=segmap.dtype)
    relabel[1:][survives] = np.arange(1, int(survives.sum()) + 1, dtype=segmap.dtype)
    flat[pixels] = relabel[flat[pixels]]
    return objects[survives], segmap


def clean_survivors(objects: np.ndarray, segmap: np.ndarray, image: np.ndarray, rms: np.ndarray,
                    thresh: float, minarea: int, clean_param: float = 1.0,
                    kernel: np.ndarray = DEFAULT_FILTER, pixels: np.ndarray | None = None) -> np.ndarray:
    """Which detections of ``sep.extract(..., clean=False)`` survive SExtractor's CLEAN.

    Parameters
    ----------
    objects : structured ndarray
        sep's catalogue (``x, y, a, b, cxx, cyy, cxy, cflux, npix, thresh, peak``), in sep's
        order.
    segmap : ndarray of int
        sep's segmentation map of the same call: object ``k`` (0-based) is label ``k + 1``.
    image : ndarray of float32
        The detection image sep was given, masked pixels already 0.
    rms : ndarray of float32
        The per-pixel noise sep was given (``err``).
    thresh : float
        The relative detection threshold (sigma).
    minarea : int
        sep's ``minarea``.
    clean_param : float
        The profile's :math:`\\beta` (sep's ``clean_param``, default 1).
    kernel : ndarray
        The detection filter (sep normalises it by the sum of its absolute values).
    pixels : ndarray of int, optional
        ``np.flatnonzero(segmap)``, if the caller has it already.

    Returns
    -------
    ndarray of bool
        ``True`` for the detections kept, in the catalogue's order.
    """
    n = len(objects)
    survives = np.ones(n, dtype=bool)
    if n < 2:
        return survives
    if pixels is None:
        pixels = np.flatnonzero(segmap.ravel())
    mthresh, abcor = _pixel_statistics(objects, segmap, pixels, image, rms, thresh, minarea, kernel)
    i, j, dx, dy = _pairs_within_reach(objects)
    if len(i) == 0:
        return survives

    beta = float(clean_param)
    a = objects["a"].astype(np.float32)
    b = objects["b"].astype(np.float32)
    flux = objects["cflux"].astype(np.float32)
    # sep's arithmetic: the profile's amplitude and slope in double precision from its float
    # fields, the ellipse term in float, the profile rounded to float before the comparison.
    unit_area = np.pi * a.astype(np.float64) * b.astype(np.float64)
    amp = flux.astype(np.float64) / (2.0 * unit_area * abcor.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        alpha = ((amp / objects["thresh"].astype(np.float32).astype(np.float64)) ** (1.0 / beta) - 1.0) \
            * unit_area / objects["npix"].astype(np.float64)
        first_brighter = flux[j] < flux[i]
        eater = np.where(first_brighter, i, j)
        eaten = np.where(first_brighter, j, i)
        cxx = objects["cxx"].astype(np.float32)[eater]
        cyy = objects["cyy"].astype(np.float32)[eater]
        cxy = objects["cxy"].astype(np.float32)[eater]
        ellipse = cxx * dx * dx + cyy * dy * dy + cxy * dx * dy
        val = 1.0 + alpha[eater] * ellipse.astype(np.float64)
        profile = np.where(val < 1e10, amp[eater] * val ** -beta, 0.0).astype(np.float32)
    eats = (val > 1.0) & (profile > mthresh[eaten])

    # The decisions in sep's order: pair (i, j), i < j, is judged in i's turn if i survived
    # to it and j is still there; i may be eaten during its own turn and go on eating.
    turn, turn_alive = -1, True
    for pi, pj, pfirst in zip(i[eats].tolist(), j[eats].tolist(), first_brighter[eats].tolist()):
        if pi != turn:
            turn, turn_alive = pi, bool(survives[pi])
        if not turn_alive or not survives[pj]:
            continue
        if pfirst:
            survives[pj] = False
        else:
            survives[pi] = False
    return survives


def _pixel_statistics(objects, segmap, pix, image, rms, thresh, minarea, kernel):
    """Each object's ``mthresh`` and isophotal area correction, from its segmentation pixels."""
    n = len(objects)
    norm = (kernel / np.abs(kernel).sum(dtype=np.float64)).astype(np.float32)
    obj_thresh = objects["thresh"].astype(np.float32).astype(np.float64)
    halfway = (obj_thresh + objects["peak"].astype(np.float32).astype(np.float64)) / 2.0
    # sep's mthresh and the pixel counts of the area correction, in one compiled pass over the
    # segment pixels (vectorised, the filter's nine gathers and the per-object ranking took
    # 0.19 s on a Galactic-plane quadrant)
    mthresh, area2, above = segment_statistics(
        np.ascontiguousarray(pix, dtype=np.int64), np.ascontiguousarray(segmap, dtype=np.int32),
        np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(rms, dtype=np.float32),
        norm, np.float32(thresh), int(minarea), obj_thresh, halfway, n)

    # analyse()'s area correction: pixels above the threshold and above half-way to the peak.
    darea = area2 - above
    ratio = obj_thresh / halfway
    with np.errstate(divide="ignore", invalid="ignore"):
        abcor = np.where(darea < 0.0, darea, -1.0) / (
            2.0 * np.pi * np.log(np.where(ratio < 1.0, ratio, 0.99))
            * objects["a"].astype(np.float32).astype(np.float64)
            * objects["b"].astype(np.float32).astype(np.float64))
    abcor = np.where(ratio > 0.0, np.minimum(abcor, 1.0), 1.0).astype(np.float32)
    return mthresh, abcor


def _pairs_within_reach(objects):
    """Pairs ``i < j`` (sorted) within ``CLEAN_ZONE * (a_i + a_j)``, with sep's float offsets.

    A k-d tree finds them in three parts, so that one large object does not widen every
    search: pairs of ordinary objects (semi-major axis up to the 99th percentile) within
    twice the zone of that axis; each larger object's neighbours within its own reach of an
    ordinary one; and the larger objects among themselves, all pairs.
    """
    n = len(objects)
    x = objects["x"].astype(np.float64)
    y = objects["y"].astype(np.float64)
    a = objects["a"].astype(np.float32)
    points = np.column_stack([x, y])
    tree = cKDTree(points)
    a_cut = float(np.percentile(a, 99.0))
    margin = 1e-3
    parts = [tree.query_pairs(2.0 * CLEAN_ZONE * a_cut + margin, output_type="ndarray")]
    large = np.flatnonzero(a > a_cut)
    if len(large):
        reach = CLEAN_ZONE * (a[large].astype(np.float64) + a_cut) + margin
        found = tree.query_ball_point(points[large], r=reach)
        sizes = np.fromiter((len(f) for f in found), dtype=np.intp, count=len(found))
        others = np.fromiter((k for f in found for k in f), dtype=np.intp, count=int(sizes.sum()))
        parts.append(np.column_stack([np.repeat(large, sizes), others]))
        li, lj = np.triu_indices(len(large), k=1)
        parts.append(np.column_stack([large[li], large[lj]]))
    pairs = np.concatenate([p.reshape(-1, 2).astype(np.int64) for p in parts])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    # Sorted, then the repeats dropped: numpy 2's hash-based np.unique took 0.19 s on the
    # 670,000 codes of a Galactic-plane quadrant, the sort 0.005 s.
    codes = np.sort(np.minimum(pairs[:, 0], pairs[:, 1]) * n + np.maximum(pairs[:, 0], pairs[:, 1]))
    first = np.ones(len(codes), dtype=bool)
    first[1:] = codes[1:] != codes[:-1]
    codes = codes[first]
    i, j = np.divmod(codes, n)
    # sep: dx, dy and (a_i + a_j)^2 in float, the zone in double
    dx = (x[i] - x[j]).astype(np.float32)
    dy = (y[i] - y[j]).astype(np.float32)
    rlim = a[i] + a[j]
    rlim = rlim * rlim
    near = ~((dx * dx + dy * dy).astype(np.float64) > rlim.astype(np.float64) * CLEAN_ZONE * CLEAN_ZONE)
    return i[near], j[near], dx[near], dy[near]
