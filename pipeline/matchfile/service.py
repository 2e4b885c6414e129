"""A small read-only HTTP light-curve service speaking IRSA's ZTF light-curve API.

``GET /cgi-bin/ZTF/nph_light_curves?<parameters>`` (IRSA's path, so a script written
against ``https://irsa.ipac.caltech.edu`` works by changing the host), ``GET /`` for help.
Parameters (names case-insensitive, as in IRSA's API):

``ID=<oid>``                    object id(s); repeat or comma-separate for several
``POS=CIRCLE <ra> <dec> <r>``   cone, degrees (0 < r <= ``MAX_RADIUS_DEG``); ID or POS, not both
``BANDNAME=g|r|i``              filters to keep, comma-separated (default all)
``MAG=<min> <max>``             keep points with min <= mag <= max
``TIME=<mjdmin> <mjdmax>``      keep points with mjdmin <= mjd <= mjdmax
``BAD_CATFLAGS_MASK=<int>``     drop points with ``catflags & mask`` non-zero
``NOBS_MIN=<int>``              drop objects with fewer points (after the cuts above)
``FORMAT=VOTABLE|CSV|TSV|HTML|IPAC_TABLE|JSON``   output (VOTable by default)
``COLLECTION=<name>``           accepted and ignored (one collection here)

``GET /cgi-bin/ZTF/nph_forced_photometry?<parameters>``: forced PSF photometry on the archived
difference images (served when the service has an archive, ``paths.fparchive``), one row per
position and covering epoch with the columns of ``skydiff forcedphot``:

``POS=<ra> <dec>``              a position (deg); repeat, or separate several by ``;`` (at most
                                ``MAX_FORCED_POSITIONS``)
``BANDNAME``, ``TIME``, ``FORMAT``, ``COLLECTION``   as above (``TIME`` on the exposure start)

Bad input gets ``400`` with a one-line message, an unexpected failure ``500`` with a
message (the traceback goes to the server log only).  Binds to 127.0.0.1 by default.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from astropy.table import Table

from pipeline.matchfile.lightcurves import LightcurveReader, check_position, select, serialise
from pipeline.matchfile.layout import fid_of_band, LayoutError
from pipeline.core.exits import BadInputError

__all__ = ["QueryError", "LightcurveQuery", "parse_query", "run_query", "make_server", "serve",
           "LIGHTCURVE_PATH", "MAX_RADIUS_DEG", "HELP_TEXT", "FORCED_PATH", "ForcedQuery", "parse_forced_query",
           "MAX_FORCED_POSITIONS"]

log = logging.getLogger("skydiff.lightcurve_service")

LIGHTCURVE_PATH = "/cgi-bin/ZTF/nph_light_curves"
FORCED_PATH = "/cgi-bin/ZTF/nph_forced_photometry"
MAX_FORCED_POSITIONS = 1500   # ZTF's forced-photometry service's limit per request
_FORCED_KNOWN = {"POS", "BANDNAME", "TIME", "FORMAT", "COLLECTION"}
MAX_RADIUS_DEG = 0.1          # 6 arcmin: larger cones return whole quadrants of light curves
MAX_IDS = 1000
_FORMATS = {"VOTABLE": "votable", "CSV": "csv", "TSV": "tsv", "HTML": "html", "IPAC_TABLE": "ipac_table",
            "JSON": "json"}
_KNOWN = {"ID", "POS", "BANDNAME", "MAG", "TIME", "BAD_CATFLAGS_MASK", "NOBS_MIN", "FORMAT", "COLLECTION"}
HELP_TEXT = (__doc__ or "").split("\n\n", 1)[1]


#: catflags and nobs are 32-bit signed integers in the matchfiles: larger masks or counts
#: cannot mean anything (and overflowed NumPy's bitwise and).
_INT32_MAX = 2**31 - 1
#: Seconds a client may take to send its request line and headers (and to read the answer):
#: a half-sent request must not hold a server thread forever.
REQUEST_TIMEOUT_S = 30.0


class QueryError(BadInputError):
    """A request the service rejects with 400 (the message is sent to the client)."""


@dataclass(frozen=True)
class LightcurveQuery:
    ids: tuple[int, ...] = ()
    cone: tuple[float, float, float] | None = None    # ra, dec, radius (deg)
    fids: tuple[int, ...] = ()
    mag_range: tuple[float, float] | None = None
    mjd_range: tuple[float, float] | None = None
    bad_flags_mask: int = 0
    nobs_min: int = 0
    format: str = "votable"


def _single(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise QueryError(f"{name} given {len(values)} times; give it once")
    return values[0].strip()


def _numbers(text: str, name: str, count: int) -> list[float]:
    parts = text.replace(",", " ").split()
    if len(parts) != count:
        raise QueryError(f"{name} needs {count} numbers, got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise QueryError(f"{name}: {text!r} is not {count} numbers") from None
    if not all(v == v and abs(v) != float("inf") for v in values):
        raise QueryError(f"{name}: values must be finite")
    return values


def _range(params, name: str) -> tuple[float, float] | None:
    text = _single(params, name)
    if text is None:
        return None
    low, high = _numbers(text, name, 2)
    if low > high:
        raise QueryError(f"{name}: minimum {low} exceeds maximum {high}")
    return low, high


def _non_negative_int(params, name: str, maximum: int = _INT32_MAX) -> int:
    text = _single(params, name)
    if text is None:
        return 0
    if len(text) > 20:      # int() of a huge digit string is slow and never a valid value
        raise QueryError(f"{name}: {text[:20]!r}... is longer than any allowed value")
    try:
        value = int(text)
    except ValueError:
        raise QueryError(f"{name}: {text!r} is not an integer") from None
    if value < 0:
        raise QueryError(f"{name} must not be negative")
    if value > maximum:
        raise QueryError(f"{name}: {value} exceeds the maximum {maximum}")
    return value


def parse_query(raw: dict[str, list[str]]) -> LightcurveQuery:
    """Validate IRSA-style parameters (as from ``urllib.parse.parse_qs``) into a query.

    Raises
    ------
    QueryError
        Unknown or repeated parameter, malformed value, bad coordinates or radius, neither
        or both of ID and POS.
    """
    params: dict[str, list[str]] = {}
    for name, values in raw.items():
        params.setdefault(name.upper(), []).extend(values)
    unknown = sorted(set(params) - _KNOWN)
    if unknown:
        raise QueryError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN))}")
    ids: list[int] = []
    for value in params.get("ID", []):
        for part in value.replace(",", " ").split():
            try:
                ids.append(int(part))
            except ValueError:
                raise QueryError(f"ID: {part!r} is not an object id") from None
            if ids[-1] < 0:
                raise QueryError(f"ID: {part} is negative")
    if len(ids) > MAX_IDS:
        raise QueryError(f"ID: at most {MAX_IDS} ids per request")
    cone = None
    pos = _single(params, "POS")
    if pos is not None:
        shape, _, rest = pos.partition(" ")
        if shape.upper() != "CIRCLE":
            raise QueryError(f"POS must be 'CIRCLE ra dec radius' (degrees), got {pos!r}")
        ra, dec, radius = _numbers(rest, "POS=CIRCLE", 3)
        try:
            check_position(ra, dec, radius)
        except ValueError as exc:
            raise QueryError(f"POS: {exc}") from None
        if radius > MAX_RADIUS_DEG:
            raise QueryError(f"POS: radius {radius} deg exceeds the maximum {MAX_RADIUS_DEG} deg")
        cone = (ra, dec, radius)
    if bool(ids) == (cone is not None):
        raise QueryError("give either ID or POS (one of them, not both)")
    fids = []
    band_text = _single(params, "BANDNAME")
    if band_text:
        for band in band_text.split(","):
            if band.strip().lower() not in ("g", "r", "i"):
                raise QueryError(f"BANDNAME: {band.strip()!r} is not g, r or i")
            fids.append(fid_of_band(band.strip()))
    fmt = (_single(params, "FORMAT") or "VOTABLE").upper()
    if fmt not in _FORMATS:
        raise QueryError(f"FORMAT {fmt!r} is not one of {', '.join(_FORMATS)}")
    return LightcurveQuery(ids=tuple(ids), cone=cone, fids=tuple(sorted(set(fids))),
                           mag_range=_range(params, "MAG"), mjd_range=_range(params, "TIME"),
                           bad_flags_mask=_non_negative_int(params, "BAD_CATFLAGS_MASK"),
                           nobs_min=_non_negative_int(params, "NOBS_MIN"), format=_FORMATS[fmt])


def run_query(reader: LightcurveReader, query: LightcurveQuery) -> Table:
    """The light-curve table a query asks for."""
    table = reader.cone(*query.cone) if query.cone else reader.by_oid(query.ids)
    return select(table, fids=query.fids, mag_range=query.mag_range, mjd_range=query.mjd_range,
                  bad_flags_mask=query.bad_flags_mask, nobs_min=query.nobs_min)


@dataclass(frozen=True)
class ForcedQuery:
    ra: tuple[float, ...]
    dec: tuple[float, ...]
    fids: tuple[int, ...] = ()
    mjd_range: tuple[float, float] | None = None
    format: str = "votable"


def _upper(raw: dict[str, list[str]], known: set[str]) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for name, values in raw.items():
        params.setdefault(name.upper(), []).extend(values)
    unknown = sorted(set(params) - known)
    if unknown:
        raise QueryError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return params


def _bands(params) -> tuple[int, ...]:
    fids = []
    band_text = _single(params, "BANDNAME")
    if band_text:
        for band in band_text.split(","):
            if band.strip().lower() not in ("g", "r", "i"):
                raise QueryError(f"BANDNAME: {band.strip()!r} is not g, r or i")
            fids.append(fid_of_band(band.strip()))
    return tuple(sorted(set(fids)))


def _format(params) -> str:
    fmt = (_single(params, "FORMAT") or "VOTABLE").upper()
    if fmt not in _FORMATS:
        raise QueryError(f"FORMAT {fmt!r} is not one of {', '.join(_FORMATS)}")
    return _FORMATS[fmt]


def parse_forced_query(raw: dict[str, list[str]]) -> ForcedQuery:
    """Validate the forced-photometry endpoint's parameters (the light-curve conventions).

    Raises
    ------
    QueryError
        Unknown or repeated parameter, malformed value, a position off the sky, no position
        or more than :data:`MAX_FORCED_POSITIONS`.
    """
    params = _upper(raw, _FORCED_KNOWN)
    ra, dec = [], []
    for value in params.get("POS", []):
        for part in value.split(";"):
            if not part.strip():
                continue
            r, d = _numbers(part, "POS", 2)
            try:
                check_position(r, d, 1.0)     # a position: any positive radius passes
            except ValueError as exc:
                raise QueryError(f"POS: {exc}") from None
            ra.append(r)
            dec.append(d)
    if not ra:
        raise QueryError("give POS=<ra> <dec> (deg) at least once")
    if len(ra) > MAX_FORCED_POSITIONS:
        raise QueryError(f"POS: {len(ra)} positions; at most {MAX_FORCED_POSITIONS} per request")
    return ForcedQuery(tuple(ra), tuple(dec), _bands(params), _range(params, "TIME"), _format(params))


def run_forced_query(archive, query: ForcedQuery, config) -> Table:
    """The forced-photometry table a query asks for."""
    from pipeline.forcedphot.lightcurves import forced_photometry

    jd_range = (-float("inf"), float("inf"))
    if query.mjd_range is not None:
        # jd < jd_max in the archive: a microsecond's slack keeps TIME's upper end inclusive.
        jd_range = (query.mjd_range[0] + 2400000.5, query.mjd_range[1] + 2400000.5 + 1e-6 / 86400)
    return forced_photometry(archive, query.ra, query.dec, jd_range, query.fids or None, config)


class _Handler(BaseHTTPRequestHandler):
    server_version = "skydiff-lightcurves/1"
    reader: LightcurveReader     # set on the subclass made by make_server
    archive = None               # DifferenceArchive, or None: no forced-photometry endpoint
    forced_config = None         # ForcedPhotConfig of the archive's measurements
    timeout = REQUEST_TIMEOUT_S  # socket timeout (StreamRequestHandler): half-sent requests end

    def log_message(self, format, *args):   # route the access log through logging
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                log.debug("client %s went away before the answer", self.address_string())

    def _error(self, status: int, message: str) -> None:
        self._send(status, f"ERROR: {message}\n".encode(), "text/plain; charset=utf-8")

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path in ("/", "/help"):
            self._send(200, HELP_TEXT.encode(), "text/plain; charset=utf-8")
            return
        if url.path.rstrip("/") == FORCED_PATH:
            self._forced(url)
            return
        if url.path.rstrip("/") != LIGHTCURVE_PATH:
            self._error(404, f"no such path {url.path!r}; light curves are at {LIGHTCURVE_PATH}")
            return
        def produce():
            query = parse_query(parse_qs(url.query, keep_blank_values=False, strict_parsing=False))
            return serialise(run_query(self.reader, query), query.format)

        self._answer(produce, LayoutError, "matchfile")

    def _answer(self, produce, store_error: type[Exception], store_name: str) -> None:
        """Send what ``produce()`` returns (body, content type): a bad query is a 400 with its
        message, an unreadable store (``store_error``) or anything else a 500 whose detail stays
        in the server log, never a traceback to the client."""
        try:
            body, content_type = produce()
        except QueryError as exc:
            self._error(400, str(exc))
            return
        except store_error as exc:
            log.error("%s problem: %s", store_name, exc)
            self._error(500, f"unreadable {store_name}: {exc}")
            return
        except Exception:
            log.exception("query %r failed", self.path)
            self._error(500, "internal error (see the server log)")
            return
        self._send(200, body, content_type)

    def _forced(self, url) -> None:
        from pipeline.forcedphot.archive import ArchiveError

        if self.archive is None:
            self._error(404, "no difference-image archive is served here (forced photometry off)")
            return
        def produce():
            query = parse_forced_query(parse_qs(url.query, keep_blank_values=False, strict_parsing=False))
            return serialise(run_forced_query(self.archive, query, self.forced_config), query.format)

        self._answer(produce, ArchiveError, "archive")

    do_HEAD = do_GET


def make_server(root: str | Path, host: str = "127.0.0.1", port: int = 0,
                request_timeout_s: float = REQUEST_TIMEOUT_S, archive: str | Path | None = None,
                forced_config=None) -> ThreadingHTTPServer:
    """A threading HTTP server over the matchfiles under ``root`` (port 0 picks a free one).

    ``request_timeout_s``: a connection that sends nothing for that long is closed.
    ``archive``: a difference-image archive root, served at :data:`FORCED_PATH` (measured with
    ``forced_config``, a :class:`~pipeline.core.config.ForcedPhotConfig`; default its defaults).

    Raises
    ------
    pipeline.matchfile.layout.LayoutError
        ``root`` is not a directory.
    """
    forced = {}
    if archive is not None:
        from pipeline.core.config import ForcedPhotConfig
        from pipeline.forcedphot.archive import DifferenceArchive

        forced = {"archive": DifferenceArchive(archive), "forced_config": forced_config or ForcedPhotConfig()}
    handler = type("LightcurveHandler", (_Handler,), {"reader": LightcurveReader(root),
                                                      "timeout": float(request_timeout_s), **forced})
    # socketserver's default listen backlog of 5 drops connections under bursts (1 s SYN retries).
    server_class = type("LightcurveServer", (ThreadingHTTPServer,), {"request_queue_size": 128})
    server = server_class((host, port), handler)
    server.daemon_threads = True
    return server


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 8080, archive: str | Path | None = None,
          forced_config=None) -> None:
    """Serve until interrupted (forced photometry too when ``archive`` is given)."""
    server = make_server(root, host, port, archive=archive, forced_config=forced_config)
    log.info("serving light curves from %s at http://%s:%d%s", root, *server.server_address[:2], LIGHTCURVE_PATH)
    try:
        server.serve_forever()
    finally:
        server.server_close()
