# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled per-pixel loops of the measurement stage, where no library offers the step.

sep measures the windowed centroids but not their errors, nor a FWHM, and its CLEAN
compares every pair of detections; the sums these need are loops over each source's
pixels.  Vectorised with NumPy they gathered every source's stamp (hundreds of bytes per
pixel of temporaries) and took a fifth of the extraction stage on a Galactic-plane
quadrant; as loops they take a few hundredths of a second.  Cython, as sep, photutils and
astropy use for theirs: the extension is built when the package is installed and loads
with it, with no compiler or cache at run time.

Callers: :func:`pipeline.measure.extract._window_moments` and
:func:`pipeline.measure.cleaning._pixel_statistics`, which state what the sums mean.
"""
import numpy as np

from libc.math cimport ceil, exp, isfinite, log, rint


def window_sums(const float[:, ::1] subtracted, const float[:, ::1] rms, const unsigned char[:, ::1] bad,
                double gain, const double[::1] xwin, const double[::1] ywin, const double[::1] sigma,
                const double[::1] half_light, int max_half):
    """The windowed sums of each source: an array of 14 rows, one column per source.

    A source's stamp is the pixels within ``h = clip(ceil(4 sigma), 2, max_half)`` of its
    central pixel and on the image; of those, the unmasked ones within ``4 sigma`` of the
    window's centre count.  With ``w`` the Gaussian window, ``I`` the pixel, ``V`` its
    variance (``rms^2 + max(I, 0) / gain``) and ``d`` its offset from the centre, the rows
    are T = sum w I, E = sum w^2 V, sum w I d d (xx, yy, xy), sum w^2 V d d (xx, yy, xy), then
    the core fit over the positive pixels within the half-light radius, weights ``I^2``: their
    count, S0 = sum I^2, S1 = sum I^2 r^2, S2 = sum I^2 r^4, Sy = sum I^2 ln I,
    Sxy = sum I^2 r^2 ln I.  A source with a non-finite centre or window gets zeros.

    Raises
    ------
    ValueError
        The maps' shapes or the per-source arrays' lengths differ (the loops index them
        without bounds checks).
    """
    cdef Py_ssize_t n = xwin.shape[0], ny = subtracted.shape[0], nx = subtracted.shape[1]
    if rms.shape[0] != ny or rms.shape[1] != nx or bad.shape[0] != ny or bad.shape[1] != nx:
        raise ValueError(f"window_sums: image {ny} x {nx}, rms {rms.shape[0]} x {rms.shape[1]} and mask "
                         f"{bad.shape[0]} x {bad.shape[1]} must have one shape")
    if not (ywin.shape[0] == sigma.shape[0] == half_light.shape[0] == n):
        raise ValueError("window_sums: xwin, ywin, sigma and half_light must have one length")
    out_array = np.zeros((14, n))
    cdef double[:, ::1] out = out_array
    wx_array = np.empty(2 * max(max_half, 2) + 1)
    cdef double[::1] wx = wx_array          # the window's factor along x, per column
    cdef Py_ssize_t k, px, py, cx, cy, x_lo, x_hi, y_lo, y_hi, h
    cdef double x, y, s2, reach2, core2, dx, dy, dx2, dy2, r2, wy, w, wi, wv, pix, noise, var, wc, wcl
    cdef double T, E, mxx, myy, mxy, cxx, cyy, cxy, count, s0, s1, s2_sum, sy, sxy
    for k in range(n):
        x, y = xwin[k], ywin[k]
        s2 = sigma[k] * sigma[k]
        if not (isfinite(x) and isfinite(y) and s2 > 0.0):
            continue
        h = min(max(<Py_ssize_t>ceil(4.0 * sigma[k]), 2), max_half)
        cx, cy = <Py_ssize_t>rint(x), <Py_ssize_t>rint(y)
        x_lo, x_hi = max(cx - h, 0), min(cx + h, nx - 1)
        y_lo, y_hi = max(cy - h, 0), min(cy + h, ny - 1)
        reach2, core2 = 16.0 * s2, half_light[k] * half_light[k]
        for px in range(x_lo, x_hi + 1):
            dx = px - x
            wx[px - x_lo] = exp(-0.5 * dx * dx / s2)
        T = E = mxx = myy = mxy = cxx = cyy = cxy = 0.0
        count = s0 = s1 = s2_sum = sy = sxy = 0.0
        for py in range(y_lo, y_hi + 1):
            dy = py - y
            dy2 = dy * dy
            wy = exp(-0.5 * dy2 / s2)
            for px in range(x_lo, x_hi + 1):
                dx = px - x
                dx2 = dx * dx
                r2 = dy2 + dx2
                if bad[py, px] or not (r2 < reach2):
                    continue
                pix = subtracted[py, px]
                noise = rms[py, px]
                var = noise * noise + max(pix, 0.0) / gain
                w = wy * wx[px - x_lo]
                wi = w * pix
                T += wi
                mxx += wi * dx2
                myy += wi * dy2
                mxy += wi * dx * dy
                wv = w * w * var
                E += wv
                cxx += wv * dx2
                cyy += wv * dy2
                cxy += wv * dx * dy
                if r2 < core2 and pix > 0.0:
                    wc = pix * pix
                    wcl = wc * log(pix)
                    count += 1.0
                    s0 += wc
                    s1 += wc * r2
                    s2_sum += wc * r2 * r2
                    sy += wcl
                    sxy += wcl * r2
        out[0, k] = T
        out[1, k] = E
        out[2, k] = mxx
        out[3, k] = myy
        out[4, k] = mxy
        out[5, k] = cxx
        out[6, k] = cyy
        out[7, k] = cxy
        out[8, k] = count
        out[9, k] = s0
        out[10, k] = s1
        out[11, k] = s2_sum
        out[12, k] = sy
        out[13, k] = sxy
    return out_array


def segment_statistics(const long long[::1] pixels, const int[:, ::1] segmap, const float[:, ::1] image,
                       const float[:, ::1] rms, const float[:, ::1] norm, float thresh, int minarea,
                       const double[::1] obj_thresh, const double[::1] halfway, Py_ssize_t n):
    """Per detection, over its segment's pixels: ``(mthresh, n_above_halfway, n_above_thresh)``.

    ``pixels`` are the flat indices of the segmentation map's labelled pixels in raster
    order (label ``k + 1`` is detection ``k``).  At each, the filtered image is summed in
    float in sep's kernel order (``convolve.c``; zero beyond the edges) and ``thresh`` times
    the noise taken off.  ``mthresh`` is what sep's heap leaves: the ``minarea``-th brightest
    of those levels but the ``(minarea + 1)``-th listed; for a detection of exactly
    ``minarea`` pixels, the first listed; 0 for smaller ones.  The counts are of the pixels
    whose value exceeds ``halfway`` and ``obj_thresh`` of their detection.

    Raises
    ------
    ValueError
        Maps of different shapes, ``minarea`` < 1, per-detection arrays shorter than ``n``,
        a pixel off the map or one whose label is not ``1..n`` (the loops index without
        bounds checks).
    """
    cdef Py_ssize_t h = image.shape[0], w = image.shape[1], kh = norm.shape[0], kw = norm.shape[1]
    cdef Py_ssize_t q, y, x, yy, xx, r, c, j, label, order
    cdef long long size = <long long>h * w
    if segmap.shape[0] != h or segmap.shape[1] != w or rms.shape[0] != h or rms.shape[1] != w:
        raise ValueError(f"segment_statistics: image {h} x {w}, segmentation map {segmap.shape[0]} x "
                         f"{segmap.shape[1]} and rms {rms.shape[0]} x {rms.shape[1]} must have one shape")
    if minarea < 1:
        raise ValueError(f"segment_statistics: minarea must be >= 1, got {minarea}")
    if obj_thresh.shape[0] < n or halfway.shape[0] < n:
        raise ValueError("segment_statistics: obj_thresh and halfway need a value per detection")
    cdef float filtered, level
    cdef double value
    top_array = np.full((n, minarea), -np.inf, dtype=np.float32)
    cdef float[:, ::1] top = top_array      # each detection's largest levels, descending
    first_array = np.zeros(n, dtype=np.float32)
    cdef float[::1] first = first_array
    listed_array = np.zeros(n, dtype=np.int64)
    cdef long long[::1] listed = listed_array
    area2_array, above_array = np.zeros(n), np.zeros(n)
    cdef double[::1] area2 = area2_array, above = above_array
    for q in range(pixels.shape[0]):
        if pixels[q] < 0 or pixels[q] >= size:
            raise ValueError(f"segment_statistics: pixel index {pixels[q]} is off the {h} x {w} map")
        y = pixels[q] // w
        x = pixels[q] - y * w
        label = segmap[y, x] - 1
        if label < 0 or label >= n:
            raise ValueError(f"segment_statistics: pixel ({y}, {x}) is labelled {label + 1}, not one of "
                             f"the detections 1..{n}")
        filtered = 0.0
        for r in range(kh):
            yy = y + r - kh // 2
            if yy < 0 or yy >= h:
                continue
            for c in range(kw):
                xx = x + c - kw // 2
                if 0 <= xx < w:
                    filtered = filtered + norm[r, c] * image[yy, xx]
        level = filtered - thresh * rms[y, x]
        value = image[y, x]
        if value > halfway[label]:
            area2[label] += 1.0
        if value > obj_thresh[label]:
            above[label] += 1.0
        order = listed[label]
        listed[label] = order + 1
        if order == 0:
            first[label] = level
        if order == minarea or not (level > top[label, minarea - 1]):
            continue
        j = minarea - 1
        while j > 0 and top[label, j - 1] < level:
            top[label, j] = top[label, j - 1]
            j -= 1
        top[label, j] = level
    mthresh_array = np.zeros(n, dtype=np.float32)
    cdef float[::1] mthresh = mthresh_array
    for label in range(n):
        if listed[label] == minarea:
            mthresh[label] = first[label]
        elif listed[label] > minarea:
            mthresh[label] = top[label, minarea - 1]
    return mthresh_array, area2_array, above_array
