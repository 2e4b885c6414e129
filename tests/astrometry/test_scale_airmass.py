"""``skydiff qa scale-airmass``: solved scale against airmass for any images, annual aberration taken out."""
from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import AltAz, SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time

from _cli import run_skydiff
from pipeline.astrometry.plots import scale_airmass_figure
from pipeline.astrometry.scale_airmass import aberration_beta_n, refraction_models, scale_airmass_study
from pipeline.core.image import write_quadrant
from pipeline.core.refraction import airmass_at, site_location

RA, DEC = 150.0, 33.0
# A night of each season (the demo's reference season in November, its science in March).
NIGHTS = {"2025-11-18T09:00": 6, "2026-03-15T03:00": 6}


def test_aberration_scale_agrees_with_astropys_apparent_frame(cfg):
    """Independent check of sign and size: angles measured in astropy's apparent (AltAz, no
    refraction) frame are the catalogue's times (1 - beta.n)."""
    location = site_location(cfg.site)
    values = []
    for when in ("2025-11-18T12:00", "2026-03-15T05:00"):
        time = Time(when, scale="utc")
        frame = AltAz(obstime=time, location=location, pressure=0 * u.hPa)
        centre = SkyCoord(RA * u.deg, DEC * u.deg)
        for pa in (0, 90):
            # A short arc centred on the field: beta.n is that of its middle.
            one = centre.directional_offset_by(pa * u.deg, 0.03 * u.deg)
            other = centre.directional_offset_by((pa + 180) * u.deg, 0.03 * u.deg)
            apparent = one.transform_to(frame).separation(other.transform_to(frame))
            ratio = (apparent / one.separation(other)).decompose().value
            beta_n = aberration_beta_n(RA, DEC, time, location)
            assert ratio - 1 == pytest.approx(-beta_n, abs=2e-8)
        values.append(beta_n)
    assert abs(values[0] - values[1]) > 5e-5      # the seasons differ by ~1e-4 in scale


def _solved_images(folder, cfg) -> list:
    """Images whose WCS scale follows the refraction model and aberration (north up, 64 x 48 px)."""
    location, models = site_location(cfg.site), refraction_models(cfg, ["ZTF_r"])
    paths = []
    for start, count in NIGHTS.items():
        for k in range(count):
            time = Time(start, scale="utc") + k * 40 * u.min
            airmass = float(airmass_at(RA, DEC, time, cfg.site)[0])
            scale = 1.012 * (1 + models["ZTF_r"].scale_change_pct(airmass, 1.0) / 100) \
                * (1 + aberration_beta_n(RA, DEC, time, location))
            header = fits.Header({"FIELDID": 600, "CCDID": 6, "QID": 1, "FILTER": "ZTF_r", "FILTERID": 2,
                                  "OBSMJD": time.mjd - 15 / 86400, "EXPTIME": 30.0, "EXPID": 1000 + len(paths),
                                  "PROGRMID": 1, "TELRA": RA, "TELDEC": DEC, "AIRMASS": airmass, "GAIN": 6.2,
                                  "READNOI": 8.0, "SATURATE": 50000.0, "ASTRUSE": True,
                                  "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": RA, "CRVAL2": DEC,
                                  "CRPIX1": 32.5, "CRPIX2": 24.5, "CD1_1": -scale / 3600, "CD1_2": 0.0,
                                  "CD2_1": 0.0, "CD2_2": scale / 3600})
            paths.append(write_quadrant(folder / f"img{len(paths):02d}.fits", np.zeros((48, 64), np.float32),
                                        header))
    return paths


def test_scale_airmass_command_takes_aberration_out(tmp_path, cfg, capsys):
    paths = _solved_images(tmp_path, cfg)
    png, table_path = tmp_path / "scale.png", tmp_path / "scale.ecsv"
    assert run_skydiff(["qa", "scale-airmass", *map(str, paths), "--out", str(png), "--table", str(table_path)],
                       cfg) == 0
    assert png.stat().st_size > 10000 and "aberration taken out" in capsys.readouterr().out
    table = Table.read(table_path)
    assert len(table) == len(paths)
    # Taken out, every image sits on the model; as solved, the seasons differ by ~1e-4 (0.01 %).
    assert np.max(np.abs(table["residual_pct"])) < 2e-5
    raw = np.asarray(table["scale_pct"] - table["model_pct"])
    assert np.ptp(raw) > 5e-3
    study, models, _ = scale_airmass_study(paths, cfg)
    figure = scale_airmass_figure(study, models)
    ax = figure.axes[0]
    assert ax.get_xlabel() == "airmass at the image centre" and "from airmass 1" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("annual aberration taken out (12 images)" in label for label in labels)
    assert any("refraction model" in label for label in labels)


def test_scale_airmass_bad_images_are_named(tmp_path, cfg, caplog):
    paths = _solved_images(tmp_path, cfg)[:1]
    unsolved = tmp_path / "unsolved.fits"
    header = fits.getheader(paths[0])
    for key in ("CTYPE1", "CTYPE2"):
        del header[key]
    write_quadrant(unsolved, np.zeros((48, 64), np.float32), header)
    assert run_skydiff(["qa", "scale-airmass", str(paths[0]), str(unsolved), "--out", str(tmp_path / "x.png")],
                       cfg) == 3
    assert "unsolved.fits: no celestial WCS" in caplog.text
    assert run_skydiff(["qa", "scale-airmass", str(tmp_path / "none.fits"), "--out", str(tmp_path / "x.png")],
                       cfg) == 3
    assert "none.fits: no such file" in caplog.text and not (tmp_path / "x.png").exists()


def test_residual_map_has_an_arrow_key_and_a_title_clear_of_its_colour_bar(tmp_path):
    from pipeline.astrometry.plots import plot_residual_map, residual_map_figure

    rng = np.random.default_rng(4)
    x, y = rng.uniform(1, 3072, 2000), rng.uniform(1, 3080, 2000)
    matches = Table({"x": x, "y": y, "dra_mas": 8 + rng.normal(0, 20, 2000) + 0.004 * x,
                     "ddec_mas": rng.normal(0, 20, 2000)})
    figure = residual_map_figure(matches, title="q21: astrometric residuals")
    figure.canvas.draw()
    quiver_axes, colour_bar = figure.axes[0], figure.axes[-1]
    keys = [child for child in quiver_axes.get_children() if type(child).__name__ == "QuiverKey"]
    assert len(keys) == 1 and keys[0].text.get_text().endswith(" mas") and keys[0].U in (1, 2, 5, 10, 20, 50)
    # The figure's title sits above every axes, the colour bar's included.
    renderer = figure.canvas.get_renderer()
    title = figure._suptitle.get_window_extent(renderer)
    assert figure._suptitle.get_text() == "q21: astrometric residuals"
    for axes in (quiver_axes, colour_bar):
        assert title.y0 >= axes.get_tightbbox(renderer).y1 - 1
    assert colour_bar.get_ylabel() == "mean residual per cell (mas)"
    assert plot_residual_map(matches, tmp_path / "r.png").stat().st_size > 10000
