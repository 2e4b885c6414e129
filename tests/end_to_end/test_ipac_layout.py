"""A science exposure of the session survey in ZTF's IPAC layout (a tile-compressed sciimg with
its mskimg, IPAC's mask bits with every SExtractor source marked) through ``skydiff quadrant``
with the real SCAMP gives the same astrometry and candidates as the same data in the native
layout."""
from __future__ import annotations

import json

import numpy as np
from astropy.table import Table

from _survey import RCID
from pipeline.cli import main
from pipeline.formats.exposure import write_exposure_ipac


def _private_config(survey, folder) -> str:
    """The survey's data (catalogues, prior, references, night files) with this run's own
    outputs, spool, history, matchfiles and difference-image archive."""
    folder.mkdir(parents=True)
    paths = {"root": survey.cfg.paths.root, **{name: str(folder / name) for name in
                                               ("outputs", "spool", "matchfiles", "fparchive")},
             "history": str(folder / "history" / "objects.sqlite")}
    config = folder / "skydiff.toml"
    config.write_text("[paths]\n" + "".join(f'{k} = "{v}"\n' for k, v in paths.items()))
    return str(config)


def _run(config: str, exposure, expid: int, outputs) -> tuple[dict, Table]:
    assert main(["quadrant", "--config", config, str(exposure), "--quadrant", str(RCID)]) == 0
    folder = outputs / "outputs" / str(expid) / f"{RCID:02d}"
    return json.loads((folder / "status.json").read_text()), Table.read(folder / "subtraction" / "candidates.ecsv")


def test_ipac_layout_gives_the_native_candidates(survey21, tmp_path):
    expid = survey21.science[0]
    native_folder = survey21.exposures[expid]
    ipac_folder = tmp_path / "ipac" / str(expid)
    (science,) = write_exposure_ipac(sorted(native_folder.glob("*.fits")), ipac_folder, "fz")
    assert science.name.endswith(f"_c{RCID // 4 + 1:02d}_o_q{RCID % 4 + 1}_sciimg.fits.fz")

    native_status, native = _run(_private_config(survey21, tmp_path / "native"), native_folder, expid,
                                 tmp_path / "native")
    ipac_status, ipac = _run(_private_config(survey21, tmp_path / "ipacrun"), ipac_folder, expid,
                             tmp_path / "ipacrun")
    assert ipac_status["state"] == native_status["state"] == "finished"
    assert ipac_status["exposure"] == str(ipac_folder)
    for key in ("rms_ra_mas", "rms_dec_mas", "n_matched"):
        assert ipac_status["astrometry"][key] == native_status["astrometry"][key], key
    assert len(ipac) == len(native) > 20
    for column in ("xpos", "ypos", "ra", "dec", "scorr", "magpsf", "sigmapsf", "rb", "flagged", "isdiffpos"):
        a, b = np.asarray(ipac[column]), np.asarray(native[column])
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9, err_msg=column)
        else:
            np.testing.assert_array_equal(a, b, err_msg=column)
    assert ipac_status["alerts"]["built"] == native_status["alerts"]["built"]
