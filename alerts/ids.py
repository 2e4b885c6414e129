"""Deterministic image and candidate ids, object names and alert topics.

Ids follow the decimal layout of ZTF's, read off every v2-v4 sample packet
(e.g. candid ``1661382530015060001``, pid ``1661382530015``, rcid 0)::

    pid    = expid * 10**4 + rcid * 10**2 + 15
    candid = pid * 10**6 + cand_index

``expid`` is the exposure id (ZTF's, and the simulator's, is night number * 10**5 + a
running number), ``rcid`` the readout channel 0-63, ``15`` the processing-code pair that
ends every ZTF pid, and ``cand_index`` the candidate's index within the quadrant image
(0-999999).  The mixed-radix layout makes the ids collision-free and lets anyone read the
exposure, quadrant and index back from a candid (:func:`split_candid`).  A rerun of the same
quadrant gives the same ids.  The largest candid (expid 922337202, rcid 99, index 999999)
stays below 2**63 - 1, Avro's ``long``.

Object ids are survey-prefixed like ZTF's ``ZTF18aaxjdyr``: the survey name in upper case,
the two-digit year of the first detection, then seven lower-case letters counting in base
26 from ``aaaaaaa`` (8.0e9 names per year); the history store hands out the counter.
"""
from __future__ import annotations

import re

__all__ = [
    "PID_PROCESSING_CODE", "MAX_EXPID", "MAX_CAND_INDEX", "make_pid", "make_candid",
    "split_candid", "object_id", "OBJECT_LETTERS", "topic_name",
]

PID_PROCESSING_CODE = 15
MAX_CAND_INDEX = 999_999
MAX_RCID = 99
_INT64_MAX = 2**63 - 1
MAX_EXPID = (_INT64_MAX - (MAX_RCID * 10**8 + PID_PROCESSING_CODE * 10**6 + MAX_CAND_INDEX)) // 10**10
OBJECT_LETTERS = 7


def _check_range(name: str, value: int, top: int) -> int:
    if isinstance(value, bool) or int(value) != value or not 0 <= int(value) <= top:
        raise ValueError(f"{name} must be an integer in 0..{top}, got {value!r}")
    return int(value)


def make_pid(expid: int, rcid: int) -> int:
    """Processing id of one quadrant image of exposure ``expid``."""
    expid = _check_range("expid", expid, MAX_EXPID)
    rcid = _check_range("rcid", rcid, MAX_RCID)
    return expid * 10**4 + rcid * 10**2 + PID_PROCESSING_CODE


def make_candid(expid: int, rcid: int, cand_index: int) -> int:
    """Candidate id of candidate ``cand_index`` of a quadrant image (signed 64-bit)."""
    return make_pid(expid, rcid) * 10**6 + _check_range("cand_index", cand_index, MAX_CAND_INDEX)


def split_candid(candid: int) -> tuple[int, int, int]:
    """``(expid, rcid, cand_index)`` of a candid made by :func:`make_candid`."""
    pid, cand_index = divmod(int(candid), 10**6)
    rest, code = divmod(pid, 100)
    expid, rcid = divmod(rest, 100)
    if code != PID_PROCESSING_CODE or candid < 0:
        raise ValueError(f"candid {candid} was not made by make_candid")
    return expid, rcid, cand_index


def object_id(survey: str, year: int, serial: int) -> str:
    """Object name ``<SURVEY><yy><7 letters>`` for the ``serial``-th object of ``year``."""
    if not 0 <= serial < 26**OBJECT_LETTERS:
        raise ValueError(f"object serial {serial} out of range for {OBJECT_LETTERS} letters")
    letters = []
    for _ in range(OBJECT_LETTERS):
        serial, digit = divmod(serial, 26)
        letters.append(chr(ord("a") + digit))
    return f"{survey.upper()}{year % 100:02d}{''.join(reversed(letters))}"


_NIGHT = re.compile(r"^\d{8}$")


def topic_name(survey: str, night: str, programid: int) -> str:
    """Kafka topic ``<survey>_<YYYYMMDD>_programid<N>`` (ZTF's ``ztf_20180401_programid1``)."""
    if not _NIGHT.match(str(night)):
        raise ValueError(f"night must be a UT date YYYYMMDD, got {night!r}")
    return f"{survey.lower()}_{night}_programid{int(programid)}"
