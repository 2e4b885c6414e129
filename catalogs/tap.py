"""A minimal synchronous TAP client (IVOA TAP 1.1 ``/sync``), stdlib HTTP only.

Used at prefetch time only, never at run time.  A query is POSTed as
``REQUEST=doQuery&LANG=ADQL&FORMAT=votable&QUERY=...`` and the VOTable answer is parsed
with ``astropy.io.votable``.  Service errors come back as TAP error documents (a VOTable
whose ``QUERY_STATUS`` INFO is ``ERROR``, with any HTTP status); truncated results carry
``QUERY_STATUS`` ``OVERFLOW``.  Both are reported, never passed on as data.
"""
from __future__ import annotations

import io
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass

from astropy.io.votable import parse as parse_votable
from astropy.table import Table

from pipeline.core.exits import EXIT_FAILED
from catalogs.schema import CatalogError

__all__ = ["GAIA_TAP_URL", "TapError", "TapResult", "tap_sync_query", "parse_tap_votable"]

GAIA_TAP_URL = "https://gea.esac.esa.int/tap-server/tap"
_USER_AGENT = "skydiff-catalogs/1 (python urllib)"


class TapError(CatalogError):
    """The TAP service could not be reached, timed out, or answered with an error."""

    exit_status = EXIT_FAILED  # the archive failed, not the input
    kind = "catalogue service"


@dataclass(frozen=True)
class TapResult:
    """A query's rows and whether the service truncated them (``QUERY_STATUS`` OVERFLOW)."""

    table: Table
    overflow: bool


def parse_tap_votable(body: bytes, url: str) -> TapResult:
    """Parse a TAP answer; raise :class:`TapError` for an error document or non-VOTable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # unit strings and VOTable dialect quibbles
            votable = parse_votable(io.BytesIO(body), verify="ignore")
    except Exception as exc:  # astropy raises assorted XML/VOTable exception types here
        snippet = body[:200].decode("utf-8", "replace").strip()
        raise TapError(f"{url}: answer is not a VOTable ({type(exc).__name__}: {exc}); "
                       f"starts with {snippet!r}") from None
    infos = list(votable.infos)
    for resource in votable.resources:
        infos.extend(resource.infos)
    statuses = [(str(info.value).upper(), (info.content or "").strip())
                for info in infos if str(info.name).upper() == "QUERY_STATUS"]
    for status, message in statuses:
        if status == "ERROR":
            raise TapError(f"{url}: TAP service error: {message or 'no message'}")
    tables = [table for resource in votable.resources for table in resource.tables]
    if not tables:
        raise TapError(f"{url}: VOTable answer holds no result table")
    table = tables[0].to_table(use_names_over_ids=True)
    return TapResult(table, any(status == "OVERFLOW" for status, _ in statuses))


def _error_message(body: bytes, url: str) -> str:
    try:
        parse_tap_votable(body, url)
    except TapError as exc:
        if "TAP service error" in str(exc):
            return str(exc).split("TAP service error: ", 1)[1]
    return body[:300].decode("utf-8", "replace").strip() or "empty body"


def _read_before(response, deadline: float, url: str, timeout_s: float) -> bytes:
    """Read a whole body, giving up at ``deadline`` even if bytes keep trickling in."""
    chunks = []
    while True:
        if time.monotonic() > deadline:
            raise TapError(f"{url}: no complete answer within {timeout_s:g} s")
        chunk = response.read(1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def tap_sync_query(url: str, adql: str, timeout_s: float = 120.0,
                   max_rows: int | None = None) -> TapResult:
    """Run an ADQL query on a TAP service's ``/sync`` endpoint.

    Parameters
    ----------
    url : str
        The TAP service base URL (``/sync`` is appended).
    adql : str
        The query.
    timeout_s : float
        Limit for the whole exchange (connection, server time, download).
    max_rows : int, optional
        Sent as ``MAXREC``; without it the service's default limit applies.

    Raises
    ------
    TapError
        Unreachable service, HTTP error (with the service's message), timeout, an answer
        that is not a VOTable, or a TAP error document.
    """
    endpoint = url.rstrip("/") + "/sync"
    fields = {"REQUEST": "doQuery", "LANG": "ADQL", "FORMAT": "votable", "QUERY": adql}
    if max_rows is not None:
        fields["MAXREC"] = str(int(max_rows))
    request = urllib.request.Request(
        endpoint, data=urllib.parse.urlencode(fields).encode("ascii"), method="POST",
        headers={"User-Agent": _USER_AGENT, "Content-Type": "application/x-www-form-urlencoded"})
    deadline = time.monotonic() + timeout_s
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = _read_before(response, deadline, endpoint, timeout_s)
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read()
        except (OSError, socket.timeout):
            body = b""
        raise TapError(f"{endpoint}: HTTP {exc.code} {exc.reason}: {_error_message(body, endpoint)}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            raise TapError(f"{endpoint}: no answer within {timeout_s:g} s") from None
        raise TapError(f"{endpoint}: cannot reach TAP service ({exc.reason})") from None
    except (TimeoutError, socket.timeout):
        raise TapError(f"{endpoint}: no answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise TapError(f"{endpoint}: connection failed ({exc})") from None
    return parse_tap_votable(body, endpoint)
