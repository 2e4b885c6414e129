"""The broker contract: real broker code from PyPI (AMPEL's ZTF alert supplier and DecentFilter,
Fink's asteroid and quality modules; tests/_brokers.py, tests/brokers/run_brokers.py) run on the
alerts the pipeline spools for the session survey's science exposures (``skydiff quadrant``).

Brokers must be able to act on our alerts: DecentFilter rejects none for a null or missing field
(the fields it needs are named in the failure), every Fink module runs on every alert, and an
alert on a simulated asteroid is a known solar-system object to both brokers.
"""
from __future__ import annotations

import numpy as np

import pytest
from astropy.table import Table

from _brokers import ROID_KNOWN_SSO, Sighting, asteroid_failures, run_brokers
from _survey import RCID
from alerts.ids import split_candid
from pipeline.cli import main
from pipeline.core.config import config_to_toml

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def spooled(survey21, tmp_path_factory):
    """Every science exposure of the survey through ``skydiff quadrant`` with this module's own
    outputs, spool, history and matchfiles; the spool folder and the brokers' report on it."""
    run = tmp_path_factory.mktemp("broker_contract")
    cfg = survey21.cfg.replace(paths__outputs=str(run / "outputs"), paths__spool=str(run / "spool"),
                               paths__history=str(run / "history" / "objects.sqlite"),
                               paths__matchfiles=str(run / "matchfiles"))
    config = run / "skydiff.toml"
    config.write_text(config_to_toml(cfg))
    for expid in survey21.science:
        assert main(["quadrant", "--config", str(config), str(survey21.exposures[expid]),
                     "--quadrant", str(RCID)]) == 0, expid
    spool = cfg.paths.resolve("spool")
    assert any(spool.rglob("*.avro")), "the survey's quadrants spooled no alert"
    return spool, run_brokers([spool])


def test_decent_filter_rejects_no_alert_for_an_empty_field(spooled):
    _, report = spooled
    assert report.alerts and not report.ingest_errors(), report.ingest_errors()
    empty = report.empty_fields()
    assert not empty, report.empty_field_summary()


def test_fink_modules_run_on_every_alert(spooled):
    _, report = spooled
    assert all("fink" in a for a in report.alerts)
    errors = {module: f"{len(failed)} of {len(report.alerts)} alerts, e.g. {next(iter(failed.values()))}"
              for module, failed in report.fink_errors().items()}
    # A NaN input makes a module's answer meaningless, or makes it raise: name them too
    # (fast_riser_candidates' drb included).
    nan = {module: dict(columns) for module, columns in report.fink_nan_inputs().items()}
    assert not errors and not nan, ("Fink modules raising (module: alerts, first error): "
                                    f"{errors}; their inputs null in our alerts (module: {{column: alerts}}): {nan}")


def asteroid_sightings(survey) -> list[Sighting]:
    """The simulated minor planets drawn on each science exposure of ``survey``, from the
    simulator's per-quadrant truth (``sim/truth/<expid>/<quadrant>_truth.fits``, HDU ASTEROIDS:
    ``ssnamenr`` as ZTF writes it, true ``ra``/``dec`` at mid-exposure, ``on_image``)."""
    sightings = []
    for expid in survey.science:
        folder = survey.exposures[expid]
        sim = folder.parents[2]                     # sim/exposures/<night>/<expid>
        for image in sorted(folder.glob("*.fits")):
            truth = Table.read(sim / "truth" / str(expid) / f"{image.stem}_truth.fits", hdu="ASTEROIDS")
            for row in truth[np.asarray(truth["on_image"], bool)]:
                sightings.append(Sighting(str(row["ssnamenr"]).strip(), expid, float(row["ra"]), float(row["dec"])))
    return sightings


def test_simulated_asteroids_are_known_solar_system_objects_to_both_brokers(spooled, survey21):
    _, report = spooled
    sightings = asteroid_sightings(survey21)
    assert sightings, "the survey's truth has no asteroid on a science exposure"
    matched, failures = asteroid_failures(report, sightings, expid_of=lambda candid: split_candid(candid)[0])
    assert matched > 0, f"no alert within 2\" of any of {len(sightings)} simulated asteroid sightings"
    assert failures == [], (f"{len(failures)} failures among {matched} alerts on simulated asteroids "
                            f"(Fink label {ROID_KNOWN_SSO} = known solar-system object):\n" + "\n".join(failures))
