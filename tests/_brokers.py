"""The broker contract harness: real broker code from PyPI run on alert packets, from a test.

``tests/brokers/run_brokers.py`` runs AMPEL's ZTF alert supplier and ``DecentFilter`` and Fink's
asteroid and quality modules in ``.venv-brokers`` (bootstrap.sh installs it from
``tests/brokers/requirements*.txt``: AMPEL needs newer numpy/astropy than skydiff pins, so it
cannot share skydiff's venv); this module starts it as a subprocess on a list of ``.avro``
files or folders and hands back its JSON report, with the questions the contract tests ask of it.
A missing broker venv is a test failure naming the command that installs it, never a skip.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "brokers" / "run_brokers.py"
BROKERS_VENV = ROOT / ".venv-brokers"
# Fink's roid_catcher labels (fink_science/ztf/asteroids/processor.py):
# 3 = flagged by ZTF as a known solar-system object (0 <= ssdistnr < 5", closer than the PS1
#     counterpart, ndethist and the number of detections in the alert <= 5);
# 2 = Fink's own SSO candidate (sgscore1 < 0.76, ndethist <= 2, no PS1 source within 5");
# 1 = first time ZTF sees the object; 0 = likely not a solar-system object.
ROID_KNOWN_SSO, ROID_FINK_SSO, ROID_FIRST, ROID_NOT_SSO = 3, 2, 1, 0


def broker_python() -> Path:
    """The broker venv's interpreter (``SKYDIFF_BROKERS_PYTHON`` overrides), or fail saying how to make it."""
    python = Path(os.environ.get("SKYDIFF_BROKERS_PYTHON") or BROKERS_VENV / "bin" / "python")
    if not python.is_file():
        raise AssertionError(
            f"the broker contract test needs AMPEL's and Fink's code in {python.parent.parent} "
            f"(not found): run `bash bootstrap.sh setup` in {ROOT} (it installs "
            "tests/brokers/requirements.txt and requirements-nodeps.txt into .venv-brokers)")
    return python


@dataclass(frozen=True)
class BrokerReport:
    """What the brokers made of a set of packets (the runner's JSON; one entry per packet)."""

    versions: dict
    decent_filter: dict
    alerts: list[dict]

    def by_candid(self) -> dict[int, dict]:
        return {a["candid"]: a for a in self.alerts}

    def ingest_errors(self) -> dict[str, str]:
        """Packet file -> the exception AMPEL's alert supplier raised reading it."""
        return {a["file"]: a["ampel"]["ingest_error"] for a in self.alerts if a["ampel"]["ingest_error"]}

    def empty_fields(self) -> dict[int, list[str]]:
        """candid -> DecentFilter's required fields that are null or missing in the packet's
        candidate (the filter's own ``keys_to_check``), for every packet with any."""
        out = {}
        for a in self.alerts:
            ampel = a["ampel"]
            fields = ampel.get("missing_fields", []) + ampel.get("null_fields", [])
            if fields or ampel.get("standard", {}).get("kind") == "null_field":
                out[a["candid"]] = fields or sorted(ampel["standard"]["reason"].values())
        return out

    def empty_field_summary(self) -> str:
        """``field: n alerts`` for every empty field, the most frequent first, and the first
        rejection DecentFilter gave those alerts (its null check stops at the first field)."""
        empty = self.empty_fields()
        counts = Counter(f for fields in empty.values() for f in fields)
        first = Counter(json.dumps(self.by_candid()[c]["ampel"]["standard"]["reason"], sort_keys=True)
                        for c in empty)
        lines = [f"{len(empty)} of {len(self.alerts)} alerts have a field DecentFilter needs null or missing:"]
        lines += [f"  {field}: {n} alerts" for field, n in counts.most_common()]
        lines += ["DecentFilter's first rejection of those alerts:"]
        lines += [f"  {reason}: {n}" for reason, n in first.most_common()]
        return "\n".join(lines)

    def fink_errors(self) -> dict[str, dict[int, str]]:
        """Fink module -> {candid: exception} for every alert that module raised on."""
        out: dict[str, dict[int, str]] = {}
        for a in self.alerts:
            for module, result in (a.get("fink") or {}).items():
                if result["error"]:
                    out.setdefault(module, {})[a["candid"]] = result["error"]
        return out

    def fink_nan_inputs(self) -> dict[str, Counter]:
        """Fink module -> Counter of its input columns that were NaN (null in the packet)."""
        out: dict[str, Counter] = {}
        for a in self.alerts:
            for module, result in (a.get("fink") or {}).items():
                out.setdefault(module, Counter()).update(result["nan_inputs"])
        return {m: c for m, c in out.items() if c}


def run_brokers(paths: Iterable[str | os.PathLike], timeout_s: float = 900.0) -> BrokerReport:
    """Run the brokers' code on ``paths`` (.avro files or folders searched recursively)."""
    args = [str(broker_python()), str(RUNNER), *map(str, paths)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONPATH": "", "PYTHONNOUSERSITE": "1"})
    if done.returncode != 0:
        raise AssertionError(f"{RUNNER.name} exited {done.returncode}:\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout)
    return BrokerReport(report["versions"], report["decent_filter"], report["alerts"])


class Sighting(NamedTuple):
    """A simulated solar-system object on one exposure: its name as ZTF writes ``ssnamenr`` and
    its true position at the exposure's mid-time."""

    name: str
    expid: int
    ra: float
    dec: float


def _separation_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Great-circle distance (haversine; this module runs without astropy's import cost per call)."""
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h)))) * 3600.0


def asteroid_failures(report: BrokerReport, sightings: Iterable[Sighting], expid_of: Callable[[int], int],
                      radius_arcsec: float = 2.0) -> tuple[int, list[str]]:
    """How many alerts lie within ``radius_arcsec`` of a simulated asteroid on their own exposure,
    and every way the brokers failed to recognise one of them, one line each.

    Such an alert must be labelled a known solar-system object by Fink's roid_catcher (label 3)
    and rejected by AMPEL's DecentFilter for its solar-system distance cut (the "sso_only"
    configuration, where that is the only cut left), not for a null field.  ``expid_of`` maps a
    candid to its exposure id.
    """
    by_expid: dict[int, list[dict]] = {}
    for a in report.alerts:
        by_expid.setdefault(expid_of(a["candid"]), []).append(a)
    matched, failures = 0, []
    for s in sightings:
        for alert in by_expid.get(s.expid, []):
            if _separation_arcsec(alert["ra"], alert["dec"], s.ra, s.dec) > radius_arcsec:
                continue
            matched += 1
            where = f"{s.name} (expid {s.expid}), alert {alert['candid']} (ssdistnr {alert['ssdistnr']}, " \
                    f"ssnamenr {alert['ssnamenr']})"
            roid = alert["fink"]["roid_catcher"]
            if roid["error"] or roid["value"] != ROID_KNOWN_SSO:
                failures.append(f"{where}: Fink's roid_catcher label {roid['value']} (error {roid['error']}, "
                                f"NaN inputs {roid['nan_inputs']}), not {ROID_KNOWN_SSO}")
            decent = alert["ampel"]["sso_only"]
            if decent["accepted"] or decent["kind"] != "cut" or "ssdistnr" not in decent["reason"]:
                verdict = "accepted it" if decent["accepted"] else f"rejected it for {decent['reason']}"
                failures.append(f"{where}: DecentFilter {verdict}, not for its ssdistnr cut")
    return matched, failures


if __name__ == "__main__":         # a look at any packets: python tests/_brokers.py FOLDER...
    r = run_brokers(sys.argv[1:])
    print(json.dumps(r.versions), r.empty_field_summary(), json.dumps(r.fink_errors(), indent=1), sep="\n")
