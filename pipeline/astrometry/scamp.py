"""The project's SCAMP runner: two-pass astrometric solution of one quadrant catalogue.

``astromatic-wrapper`` is unmaintained and shells out with ``shell=True``, so this small
runner takes its place.  It follows what was measured with SCAMP 2.10 on simulated
ZTF-like quadrants:

- pass 1 pattern-matches with little freedom (``STABILITY_TYPE PRE-DISTORTED``,
  ``FOCDISTORT_DEGREE 2``); pass 2 starts from pass 1's ``.head`` as its ``.ahead`` and fits
  TPV degree 4 without matching;
- SCAMP exits 0 on failed solutions, so success is judged from its XML (XY contrast,
  number of reference matches, residual sigma), never from the exit code;
- an empty catalogue or a reference catalogue with no stars in the field makes SCAMP spin
  forever: row counts are checked first and every run has a timeout that kills the
  process group;
- each pass runs in its own directory under plain file names (SCAMP does not escape
  names in its XML), with ``AHEADER_GLOBAL`` pointing at a file that does not exist, and
  with a copy of the catalogue whose embedded image header has had every WCS keyword
  removed, so the ``.ahead`` is the only prior SCAMP sees.
"""
from __future__ import annotations

import os
import re
import shutil
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.votable import parse as parse_votable
from astropy.table import Table

from pipeline.core.config import AstrometryConfig
from pipeline.formats.ldac import LDACError, read_ldac, write_ldac
from pipeline.formats.scamp_head import (WcsHeaderError, read_head, strip_wcs_keywords, wcs_from_header,
                       write_ahead)
from pipeline.core.exits import PipelineError, RetryableError

__all__ = ["ScampError", "ScampNotFoundError", "ScampInputError", "scamp_parameters",
           "ScampInputs", "ScampQA", "ScampPassResult", "ScampResult", "load_inputs",
           "run_scamp_pass", "solve_with_scamp", "parse_scamp_xml", "ScampOutputError"]

DETECTION_COLUMNS = ("XWIN_IMAGE", "YWIN_IMAGE", "ERRAWIN_IMAGE", "ERRBWIN_IMAGE",
                     "FLUX_AUTO", "FLUXERR_AUTO")
REFERENCE_COLUMNS = ("X_WORLD", "Y_WORLD", "ERRA_WORLD", "ERRB_WORLD", "MAG")
CATALOG_NAME = "quadrant.ldac"          # plain names: SCAMP writes them unescaped into XML
REFERENCE_NAME = "refcat.ldac"
CONFIG_NAME = "scamp.conf"
XML_NAME = "scamp.xml"
LOG_NAME = "scamp.log"
ABSENT_GLOBAL_AHEAD = "no_global_header.ahead"
_XML_UNSAFE = re.compile(r"[&<>\"']|[^\x20-\x7e]")
_TERMINAL_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_REFERENCES_LOADED = re.compile(r"(\d+)\s+astrometric references loaded")


class ScampError(PipelineError, RuntimeError):
    """SCAMP could not be run at all."""


class ScampOutputError(RetryableError, ScampError):
    """SCAMP exited 0 but left no readable output: an environment fault, exit 75 (retry)."""


class ScampNotFoundError(ScampError, FileNotFoundError):
    """The SCAMP executable is not installed or not on PATH."""


class ScampInputError(ScampError, ValueError):
    """A catalogue, prior or working directory SCAMP cannot be given."""


def scamp_parameters(settings: AstrometryConfig, pass_number: int) -> dict[str, str]:
    """The SCAMP configuration of pass 1 (matching) or pass 2 (full distortion)."""
    common = {
        "ASTREF_CATALOG": "FILE", "ASTREFCAT_NAME": REFERENCE_NAME,
        "PROJECTION_TYPE": "TPV", "MOSAIC_TYPE": "UNCHANGED", "SOLVE_PHOTOM": "N",
        "CHECKPLOT_TYPE": "NONE", "CHECKPLOT_DEV": "NULL", "CHECKIMAGE_TYPE": "NONE",
        "MERGEDOUTCAT_TYPE": "NONE", "FULLOUTCAT_TYPE": "NONE", "SAVE_REFCATALOG": "N",
        "WRITE_XML": "Y", "XML_NAME": XML_NAME,
        "SN_THRESHOLDS": ",".join(f"{v:g}" for v in settings.sn_thresholds),
        "AHEADER_GLOBAL": ABSENT_GLOBAL_AHEAD, "AHEADER_SUFFIX": ".ahead",
        "HEADER_SUFFIX": ".head", "HEADER_TYPE": "NORMAL",
        "VERBOSE_TYPE": "NORMAL", "NTHREADS": str(settings.scamp_threads),
        "ASTRACCURACY_TYPE": "SIGMA-PIXEL", "ASTR_ACCURACY": f"{settings.astr_accuracy_px:g}",
        "FLAGS_MASK": f"0x{settings.flags_mask:04x}",
    }
    if pass_number == 1:
        specific = {
            "MATCH": "Y", "STABILITY_TYPE": "PRE-DISTORTED",
            "FOCDISTORT_DEGREE": str(settings.focdistort_degree),
            "POSITION_MAXERR": f"{settings.position_maxerr_arcmin:g}",
            "POSANGLE_MAXERR": f"{settings.posangle_maxerr_deg:g}",
            "PIXSCALE_MAXERR": f"{settings.pixscale_maxerr:g}",
            "CROSSID_RADIUS": f"{settings.pass1_crossid_radius_arcsec:g}",
            "MATCH_RESOL": f"{settings.match_resol_arcsec:g}",
            "MATCH_NMAX": str(settings.match_nmax),
        }
    elif pass_number == 2:
        specific = {
            "MATCH": "N", "STABILITY_TYPE": "INSTRUMENT",
            "DISTORT_DEGREES": str(settings.distort_degree),
            "CROSSID_RADIUS": f"{settings.pass2_crossid_radius_arcsec:g}",
        }
    else:
        raise ValueError(f"SCAMP pass must be 1 or 2, got {pass_number}")
    return {**common, **specific}


@dataclass(frozen=True)
class ScampInputs:
    """A detection catalogue and reference catalogue checked and ready for SCAMP."""

    detections_path: Path
    reference_path: Path
    detections: Table
    image_header: fits.Header       # the catalogue's image header, WCS keywords removed
    shape: tuple[int, int]          # numpy order (ny, nx)
    n_detections: int
    n_reference: int
    n_reference_in_field: int
    reason: str | None              # why SCAMP must not be run, or None


@dataclass(frozen=True)
class ScampQA:
    """Astrometric quality figures from SCAMP's XML (one catalogue, one field group)."""

    xy_contrast: float | None       # None in pass 2: no pattern matching
    n_detections_loaded: int
    n_reference_loaded: int | None  # from SCAMP's log (the XML does not hold it)
    astrom_ndets_reference: int
    astrom_sigma_reference_arcsec: tuple[float, float]
    astrom_offset_reference_arcsec: tuple[float, float]
    astrom_chi2_reference: float
    astrom_ndets_reference_highsn: int
    astrom_sigma_reference_highsn_arcsec: tuple[float, float]
    astrom_chi2_reference_highsn: float
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class ScampPassResult:
    """The outcome of one SCAMP pass."""

    pass_number: int
    ok: bool
    reason: str | None
    head: fits.Header | None        # SCAMP's .head for this pass
    qa: ScampQA | None
    seconds: float | None           # wall time of the SCAMP process; None if not run
    returncode: int | None          # None if not run or killed on timeout
    stderr_tail: str
    run_dir: Path | None


@dataclass(frozen=True)
class ScampResult:
    """The outcome of the two-pass solution; ``wcs_header`` is pass 2's ``.head``."""

    ok: bool
    reason: str | None
    wcs_header: fits.Header | None
    pass1: ScampQA | None           # None when SCAMP was not run (input checks failed)
    pass2: ScampQA | None
    seconds_pass1: float | None
    seconds_pass2: float | None
    returncode: int | None
    stderr_tail: str
    n_detections: int
    n_reference_in_field: int


def _resolve_binary(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise ScampNotFoundError(
            f"SCAMP executable {binary!r} not found (install it with 'apt-get install scamp' "
            "or set astrometry.scamp_binary)")
    return found


def _require_columns(table: Table, columns, path: Path) -> None:
    missing = [c for c in columns if c not in table.colnames]
    if missing:
        raise ScampInputError(f"{path}: missing column(s) {', '.join(missing)} SCAMP needs")


def _count_in_field(reference: Table, ahead: fits.Header, shape, margin_arcmin: float) -> int:
    """Reference stars whose prior pixel position falls on the image (plus a margin)."""
    wcs = wcs_from_header(ahead, shape)
    ny, nx = shape
    ra = np.asarray(reference["X_WORLD"], float)
    dec = np.asarray(reference["Y_WORLD"], float)
    # A cheap angular cut first, so a whole Gaia tile is not pushed through the
    # iterative TPV inversion.
    centre_ra, centre_dec = wcs.all_pix2world([[(nx + 1) / 2, (ny + 1) / 2]], 1)[0]
    pixel_deg = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))))
    margin_px = margin_arcmin / 60.0 / pixel_deg
    radius_deg = (0.5 * np.hypot(nx, ny) + margin_px) * pixel_deg * 1.1
    cos_sep = (np.sin(np.deg2rad(dec)) * np.sin(np.deg2rad(centre_dec))
               + np.cos(np.deg2rad(dec)) * np.cos(np.deg2rad(centre_dec))
               * np.cos(np.deg2rad(ra - centre_ra)))
    near = cos_sep > np.cos(np.deg2rad(radius_deg))
    if not near.any():
        return 0
    x, y = wcs.all_world2pix(ra[near], dec[near], 1, quiet=True)
    inside = ((x > 0.5 - margin_px) & (x < nx + 0.5 + margin_px)
              & (y > 0.5 - margin_px) & (y < ny + 0.5 + margin_px))
    return int(np.count_nonzero(inside))


def load_inputs(detections_ldac: str | os.PathLike, reference_ldac: str | os.PathLike,
                ahead: fits.Header, settings: AstrometryConfig,
                image_shape: tuple[int, int] | None = None) -> ScampInputs:
    """Read and check both catalogues against the prior before SCAMP is run.

    Unreadable files, missing columns or an image size that disagrees with
    ``image_shape`` raise :class:`ScampInputError`.  Too few detections or no usable
    reference stars in the field are not errors but a ``reason`` not to run SCAMP
    (which would spin forever on them).
    """
    det_path, ref_path = Path(detections_ldac), Path(reference_ldac)
    try:
        detections, header = read_ldac(det_path)
        reference, _ = read_ldac(ref_path)
    except LDACError as exc:
        raise ScampInputError(str(exc)) from None
    _require_columns(detections, DETECTION_COLUMNS, det_path)
    _require_columns(reference, REFERENCE_COLUMNS, ref_path)
    if header is None or "NAXIS1" not in header or "NAXIS2" not in header:
        raise ScampInputError(f"{det_path}: LDAC_IMHEAD with NAXIS1/NAXIS2 is required")
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    if image_shape is not None and tuple(int(n) for n in image_shape) != shape:
        raise ScampInputError(f"{det_path}: image size {shape} (ny, nx) in LDAC_IMHEAD "
                              f"differs from the image shape {tuple(image_shape)}")
    try:
        wcs_from_header(ahead, shape)
    except WcsHeaderError as exc:
        raise ScampInputError(f"prior (.ahead) header: {exc}") from None

    finite = np.isfinite(np.asarray(detections["XWIN_IMAGE"], float)) & np.isfinite(
        np.asarray(detections["YWIN_IMAGE"], float))
    n_detections = int(np.count_nonzero(finite))
    n_reference = len(reference)
    n_in_field = (_count_in_field(reference, ahead, shape, settings.position_maxerr_arcmin)
                  if n_reference else 0)
    reason = None
    if n_detections < settings.min_detections:
        reason = (f"too few detections: {n_detections} in {det_path.name} "
                  f"(need >= {settings.min_detections})")
    elif n_reference == 0:
        reason = f"reference catalogue {ref_path.name} is empty"
    elif n_in_field < settings.min_matched:
        reason = (f"only {n_in_field} of {n_reference} reference stars fall within the "
                  f"field of the prior (need >= {settings.min_matched})")
    return ScampInputs(det_path, ref_path, detections, strip_wcs_keywords(header), shape,
                       n_detections, n_reference, n_in_field, reason)


def _fresh_run_dir(workdir: Path, pass_number: int) -> Path:
    run_dir = Path(workdir).resolve() / f"scamp_pass{pass_number}"
    if _XML_UNSAFE.search(str(run_dir)):
        raise ScampInputError(f"{run_dir}: SCAMP writes its working path unescaped into its "
                              "XML; use a directory path without &<>\"' or non-ASCII characters")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copyfile(source, target)


def _write_config(path: Path, parameters: dict[str, str]) -> None:
    path.write_text("".join(f"{key:<22} {value}\n" for key, value in parameters.items()),
                    encoding="ascii")


def _log_tail(path: Path, n_lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="latin-1")
    except OSError:
        return ""
    text = _TERMINAL_CONTROL.sub("", text)
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip(" >")]
    return "\n".join(lines[-n_lines:])


def _execute(binary: str, run_dir: Path, timeout_s: float) -> tuple[int | None, float]:
    """Run SCAMP in ``run_dir``; returns (returncode or None on timeout, seconds).

    ``Popen`` rather than ``subprocess.run``: on a timeout the whole process group is
    killed, not only the direct child.
    """
    command = [binary, CATALOG_NAME, "-c", CONFIG_NAME]
    start = time.perf_counter()
    with open(run_dir / LOG_NAME, "wb") as log:
        try:
            process = subprocess.Popen(command, cwd=run_dir, stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        except OSError as exc:
            raise ScampError(f"cannot start SCAMP {binary}: {exc.strerror}") from None
        try:
            returncode = _wait_exactly(process, timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return returncode, time.perf_counter() - start


def _wait_exactly(process: subprocess.Popen, timeout_s: float) -> int:
    """Wait for ``process`` to end, waking the moment it does.

    ``Popen.wait(timeout)`` polls with sleeps growing to 50 ms, which a two-pass solve pays
    on every pass; a pidfd (Linux 5.3+) becomes readable exactly when the child exits.
    """
    try:
        descriptor = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        return process.wait(timeout=timeout_s)
    try:
        poller = select.poll()
        poller.register(descriptor, select.POLLIN)
        if not poller.poll(max(0, int(timeout_s * 1000))):
            raise subprocess.TimeoutExpired(process.args, timeout_s)
    finally:
        os.close(descriptor)
    return process.wait()


def _pair(value) -> tuple[float, float]:
    values = np.asarray(value, float).ravel()
    return float(values[0]), float(values[1])


def parse_scamp_xml(path: str | os.PathLike, log_path: str | os.PathLike | None = None) -> ScampQA:
    """Read the quality figures of a one-catalogue SCAMP run from its XML (VOTable)."""
    try:
        votable = parse_votable(str(path))
        fields = votable.get_table_by_id("Fields").array
        groups = votable.get_table_by_id("FGroups").array
        try:
            messages = tuple(str(m) for m in votable.get_table_by_id("Warnings").array["Msg"])
        except (KeyError, IndexError):
            messages = ()
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ScampError(f"{path}: unreadable SCAMP XML ({exc})") from None
    if len(fields) == 0 or len(groups) == 0:
        raise ScampError(f"{path}: SCAMP XML has no field (SCAMP failed early)")
    n_reference_loaded = None
    if log_path is not None:
        found = _REFERENCES_LOADED.findall(_log_tail(Path(log_path), n_lines=10_000))
        n_reference_loaded = int(found[-1]) if found else None
    return ScampQA(
        xy_contrast=(float(fields["XY_Contrast"][0]) if "XY_Contrast" in fields.dtype.names
                     else None),
        n_detections_loaded=int(fields["NDetect"][0]),
        n_reference_loaded=n_reference_loaded,
        astrom_ndets_reference=int(groups["AstromNDets_Reference"][0]),
        astrom_sigma_reference_arcsec=_pair(groups["AstromSigma_Reference"][0]),
        astrom_offset_reference_arcsec=_pair(groups["AstromOffset_Reference"][0]),
        astrom_chi2_reference=float(groups["AstromChi2_Reference"][0]),
        astrom_ndets_reference_highsn=int(groups["AstromNDets_Reference_HighSN"][0]),
        astrom_sigma_reference_highsn_arcsec=_pair(groups["AstromSigma_Reference_HighSN"][0]),
        astrom_chi2_reference_highsn=float(groups["AstromChi2_Reference_HighSN"][0]),
        warnings=messages,
    )


def _verdict(qa: ScampQA, pass_number: int, settings: AstrometryConfig) -> str | None:
    """Why the solution of this pass is unusable, or None if it passes every threshold."""
    if qa.n_reference_loaded == 0:
        # every row written was refused by SCAMP (its FLAGS_MASK applies to the references too)
        return (f"pass {pass_number}: no usable reference star: SCAMP loaded 0 astrometric references "
                f"from {REFERENCE_NAME}")
    if pass_number == 1 and not (qa.xy_contrast or 0.0) >= settings.min_xy_contrast:
        contrast = "absent" if qa.xy_contrast is None else f"{qa.xy_contrast:.3g}"
        return (f"pass 1 pattern matching failed: XY contrast {contrast} "
                f"< {settings.min_xy_contrast:g}")
    if qa.astrom_ndets_reference < settings.min_matched:
        return (f"pass {pass_number}: only {qa.astrom_ndets_reference} detections matched "
                f"the reference catalogue (need >= {settings.min_matched})")
    sigma = max(qa.astrom_sigma_reference_arcsec)
    if not sigma <= settings.max_sigma_arcsec:
        return (f"pass {pass_number}: reference residual sigma {sigma:.3f} arcsec "
                f"> {settings.max_sigma_arcsec:g}")
    return None


def _run_pass(inputs: ScampInputs, ahead: fits.Header, pass_number: int,
              settings: AstrometryConfig, binary: str, workdir: Path) -> ScampPassResult:
    run_dir = _fresh_run_dir(workdir, pass_number)
    write_ldac(run_dir / CATALOG_NAME, inputs.detections, inputs.image_header)
    _link_or_copy(inputs.reference_path, run_dir / REFERENCE_NAME)
    write_ahead(run_dir / Path(CATALOG_NAME).with_suffix(".ahead").name, ahead)
    _write_config(run_dir / CONFIG_NAME, scamp_parameters(settings, pass_number))

    returncode, seconds = _execute(binary, run_dir, settings.scamp_timeout_s)
    tail = _log_tail(run_dir / LOG_NAME)

    def outcome(reason, head=None, qa=None):
        return ScampPassResult(pass_number, reason is None, reason, head, qa, seconds,
                               returncode, tail, run_dir)

    if returncode is None:
        return outcome(f"pass {pass_number}: timeout, SCAMP killed after "
                       f"{settings.scamp_timeout_s:g} s")
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else ""
        return outcome(f"pass {pass_number}: SCAMP crashed (killed by signal "
                       f"{-returncode}{' ' + name if name else ''})")
    if returncode != 0:
        return outcome(f"pass {pass_number}: SCAMP failed with exit status {returncode}")
    # SCAMP reporting success without a readable XML is not a verdict on the image: its
    # environment failed it (disk full, a broken binary); a retry may succeed.
    xml_path = run_dir / XML_NAME
    if not xml_path.exists():
        raise ScampOutputError(f"pass {pass_number}: SCAMP exited 0 but wrote no XML ({run_dir})")
    try:
        qa = parse_scamp_xml(xml_path, run_dir / LOG_NAME)
    except ScampError as exc:
        raise ScampOutputError(f"pass {pass_number}: SCAMP exited 0 but {exc}") from None
    head_path = run_dir / Path(CATALOG_NAME).with_suffix(".head").name
    try:
        head = read_head(head_path)
    except WcsHeaderError as exc:
        return outcome(f"pass {pass_number}: no usable .head ({exc})", qa=qa)
    return outcome(_verdict(qa, pass_number, settings), head=head, qa=qa)


def run_scamp_pass(pass_number: int, detections_ldac: str | os.PathLike,
                   reference_ldac: str | os.PathLike, ahead: fits.Header,
                   settings: AstrometryConfig, workdir: str | os.PathLike,
                   image_shape: tuple[int, int] | None = None) -> ScampPassResult:
    """Run one SCAMP pass (1: pattern matching, 2: full distortion) from prior ``ahead``.

    The pass runs in ``workdir/scamp_pass<N>`` (replaced if present).  Input checks that
    fail give a result that is not ok, without running SCAMP.
    """
    binary = _resolve_binary(settings.scamp_binary)
    inputs = load_inputs(detections_ldac, reference_ldac, ahead, settings, image_shape)
    if inputs.reason is not None:
        return ScampPassResult(pass_number, False, inputs.reason, None, None, None, None, "",
                               None)
    return _run_pass(inputs, ahead, pass_number, settings, binary, Path(workdir))


def solve_with_scamp(detections_ldac: str | os.PathLike, reference_ldac: str | os.PathLike,
                     ahead: fits.Header, image_shape: tuple[int, int],
                     settings: AstrometryConfig, workdir: str | os.PathLike) -> ScampResult:
    """Solve a quadrant's astrometry with SCAMP in two passes.

    Parameters
    ----------
    detections_ldac : path
        LDAC catalogue of the quadrant (``XWIN_IMAGE``/``YWIN_IMAGE`` 1-based, their
        errors, ``FLUX_AUTO``/``FLUXERR_AUTO``; ``LDAC_IMHEAD`` with NAXIS1/NAXIS2).  Any WCS
        in its image header is ignored.
    reference_ldac : path
        Reference catalogue (``X_WORLD``, ``Y_WORLD``, ``ERRA_WORLD``, ``ERRB_WORLD`` in
        degrees, ``MAG``), already propagated to the exposure epoch.
    ahead : Header
        The prior WCS (TPV), written as pass 1's ``.ahead``.
    image_shape : (ny, nx)
        Numpy shape of the quadrant image; must match the catalogue's NAXIS2/NAXIS1.
    settings : AstrometryConfig
        The ``[astrometry]`` section: how SCAMP is run and the thresholds of its verdict.
    workdir : path
        Folder for the per-pass run directories ``scamp_pass1`` and ``scamp_pass2``.

    Returns
    -------
    ScampResult
        ``ok`` only when both passes meet the thresholds of ``settings``; ``wcs_header``
        is pass 2's ``.head`` (apply it with :func:`pipeline.formats.scamp_head.apply_wcs_header`).

    Raises
    ------
    ScampNotFoundError
        The SCAMP binary is not installed.
    ScampInputError
        Unreadable catalogues, missing columns, a bad prior or an unusable workdir.
    """
    binary = _resolve_binary(settings.scamp_binary)
    inputs = load_inputs(detections_ldac, reference_ldac, ahead, settings, image_shape)
    base = dict(n_detections=inputs.n_detections, n_reference_in_field=inputs.n_reference_in_field)
    if inputs.reason is not None:
        return ScampResult(False, inputs.reason, None, None, None, None, None, None, "", **base)
    first = _run_pass(inputs, ahead, 1, settings, binary, Path(workdir))
    if not first.ok:
        return ScampResult(False, first.reason, None, first.qa, None, first.seconds, None,
                           first.returncode, first.stderr_tail, **base)
    second = _run_pass(inputs, first.head, 2, settings, binary, Path(workdir))
    return ScampResult(second.ok, second.reason, second.head if second.ok else None,
                       first.qa, second.qa, first.seconds, second.seconds,
                       second.returncode, second.stderr_tail, **base)
