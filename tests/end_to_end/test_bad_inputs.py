"""The bad-input matrix: files, headers, configurations and queries a user gets wrong.

Every case runs the real command line in-process (``pipeline.cli``) on small inputs and must
end with the exit status the README's exit-status table gives its kind (2 usage or
configuration, 3 bad input, 75 a history database that cannot be reached), a message naming the file or parameter, no traceback, and every
file that was there before unchanged (each case's output folder holds an earlier product).
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pytest
from astropy.io import fits

from pipeline import cli
from pipeline.core.exits import exit_status_of
from pipeline.core.image import REQUIRED_KEYWORDS, write_quadrant

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
EXIT_TABLE = {int(code) for code in re.findall(r"^\| (\d+) \| ", README.split("### Exit statuses", 1)[1], re.M)}

CONTRACT = dict(FIELDID=600, CCDID=6, QID=1, FILTER="ZTF_r", FILTERID=2, OBSMJD=61114.3, EXPTIME=30.0,
                EXPID=299500001, PROGRMID=1, TELRA=150.0, TELDEC=33.0, AIRMASS=1.02, GAIN=6.2, READNOI=8.0,
                SATURATE=50000.0)


def _header(**changes) -> fits.Header:
    header = fits.Header()
    for key, value in {**CONTRACT, **changes}.items():
        if value is not None:
            header[key] = value
    return header


def _image(path: Path, header: fits.Header | None = None, data=None) -> Path:
    data = np.full((40, 50), 100.0, np.float32) if data is None else data
    return write_quadrant(path, data, _header() if header is None else header)


class World:
    """A tmp folder with a configuration, a valid small image and an output folder holding an
    earlier product (which no failing command may touch)."""

    def __init__(self, root: Path):
        self.root = root
        self.config = root / "skydiff.toml"
        self.config.write_text(f'[paths]\nroot = "{root}"\n')
        self.good = _image(root / "good.fits")
        self.out = root / "out"
        self.out.mkdir()
        (self.out / "earlier.json").write_text('{"kept": true}')

    def path(self, name: str) -> str:
        return str(self.root / name)

    def write(self, name: str, content: bytes | str) -> str:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def image(self, name: str, **changes) -> str:
        return str(_image(self.root / name, _header(**changes)))

    def solved(self, name: str = "solved.fits", **changes) -> str:
        """The valid image with a WCS (a first guess, or a solution with ASTRUSE = T)."""
        return self.image(name, CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=150.0, CRVAL2=33.0, CRPIX1=25.5,
                          CRPIX2=20.5, CD1_1=-2.811e-4, CD1_2=0.0, CD2_1=0.0, CD2_2=2.811e-4, ASTRUSE=True,
                          **changes)


def _astrometry(image_of):
    return lambda w: ["astrometry", image_of(w), "--refcat", w.path("gaia-store"), "--out", str(w.out)]


def _no_image_data(w):
    fits.PrimaryHDU(header=_header()).writeto(w.root / "empty.fits")
    return w.path("empty.fits")


def _cube(w):
    return str(_image(w.root / "cube.fits", data=np.zeros((3, 40, 50), np.float32)))


def _folder_with(w, name: str, content: str, qa: str | None = None) -> str:
    """A products folder holding one (broken) file, and a qa.json when given."""
    folder = w.root / "products"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(content)
    if qa is not None:
        (folder / "qa.json").write_text(qa)
    return str(folder)


def _table(w, name: str) -> str:
    from astropy.table import Table
    Table({"a": [1, 2]}).write(w.root / name)
    return str(w.root / name)


def _toml(text: str):
    return lambda w: ["config", "--config", w.write("bad.toml", text)]


# (id, argv maker, expected status, text the message must hold: a callable of the world or a string)
FILES = [
    ("astrometry-missing-image", _astrometry(lambda w: w.path("nope.fits")), 3, "nope.fits"),
    ("astrometry-zero-byte", _astrometry(lambda w: w.write("zero.fits", b"")), 3, "zero.fits"),
    ("astrometry-text-file", _astrometry(lambda w: w.write("text.fits", "not a FITS file\n" * 50)), 3, "text.fits"),
    ("astrometry-truncated-fits", _astrometry(lambda w: w.write("cut.fits", w.good.read_bytes()[:4000])), 3,
     "cut.fits"),
    ("astrometry-no-image-data", _astrometry(_no_image_data), 3, "empty.fits"),
    ("astrometry-3d-image", _astrometry(_cube), 3, "cube.fits"),
    ("astrometry-directory-as-image", _astrometry(lambda w: str(w.out)), 3, "out"),
    ("astrometry-missing-refcat", lambda w: ["astrometry", w.solved(), "--refcat", w.path("gaia-store"),
                                             "--out", str(w.out)], 3, "gaia-store"),
    ("astrometry-missing-prior", lambda w: ["astrometry", str(w.good), "--refcat", w.path("gaia-store"),
                                            "--prior", w.path("prior.fits"), "--out", str(w.out)], 3, "prior.fits"),
    ("subtract-missing-science", lambda w: ["subtract", w.path("sci.fits"), str(w.good), "--out", str(w.out)], 3,
     "sci.fits"),
    ("subtract-missing-reference", lambda w: ["subtract", w.solved(), w.path("ref.fits"), "--out", str(w.out)], 3,
     "ref.fits"),
    ("subtract-unsolved-science", lambda w: ["subtract", str(w.good), str(w.good), "--out", str(w.out)], 3,
     "good.fits"),
    ("reference-show-missing", lambda w: ["reference", "show", w.path("ref.fits")], 3, "ref.fits"),
    ("reference-show-not-a-reference", lambda w: ["reference", "show", str(w.good)], 3, "good.fits"),
    ("reference-build-no-images", lambda w: ["reference", "build", str(w.out), "--refcat", w.path("gaia"),
                                             "--out", str(w.out)], 3, "out"),
    ("priors-build-missing-matches", lambda w: ["priors", "build", w.path("m.fits"), "--out",
                                                str(w.out / "prior.fits")], 3, "m.fits"),
    ("priors-ahead-missing-prior", lambda w: ["priors", "ahead", w.path("prior.fits"), str(w.good), "--out",
                                              str(w.out / "x.ahead")], 3, "prior.fits"),
    ("matchfile-append-missing", lambda w: ["matchfile", "append", w.path("nosuch"), "--root", str(w.out)], 3,
     "nosuch"),
    ("matchfile-fold-missing-root", lambda w: ["matchfile", "fold", "--root", w.path("mf")], 3, "mf"),
    ("matchfile-fold-missing-file", lambda w: ["matchfile", "fold", w.path("x_match.h5"), "--root", str(w.out)], 3,
     "x_match.h5"),
    ("matchfile-seed-not-a-reference", lambda w: ["matchfile", "seed", str(w.good), "--root", str(w.out)], 3,
     "good.fits"),
    ("alerts-show-garbage", lambda w: ["alerts", "show", w.write("x.avro", b"garbage")], 3, "x.avro"),
    ("alerts-show-missing", lambda w: ["alerts", "show", w.path("none.avro")], 3, "none.avro"),
    ("alerts-publish-incomplete-folder", lambda w: ["alerts", "publish", str(w.out), "--spool", w.path("spool"),
                                                    "--history", w.path("h.sqlite")], 3, "qa.json"),
    ("candidates-list-missing", lambda w: ["candidates", "list", w.path("sub")], 3, "sub"),
    ("candidates-show-incomplete", lambda w: ["candidates", "show", str(w.out), "3"], 3, "qa.json"),
    ("realbogus-show-garbage", lambda w: ["realbogus", "show", w.write("rb.json", "{not json")], 3, "rb.json"),
    ("realbogus-show-missing", lambda w: ["realbogus", "show", w.path("rb.json")], 3, "rb.json"),
    ("qa-scale-airmass-unsolved", lambda w: ["qa", "scale-airmass", str(w.good), "--out", str(w.out / "s.png")], 3,
     "good.fits"),
    ("catalogs-info-missing-store", lambda w: ["catalogs", "info", "--store", w.path("store")], 3, "store"),
    ("catalogs-prefetch-bad-table", lambda w: ["catalogs", "prefetch", "--from-table", w.write("t.fits", b"x"),
                                               "--field", "150", "33", "--store", str(w.out)], 3, "t.fits"),
    ("solarsystem-ingest-missing", lambda w: ["solarsystem", "ingest", w.path("MPCORB.DAT")], 3, "MPCORB.DAT"),
    ("solarsystem-ingest-garbage", lambda w: ["solarsystem", "ingest", w.write("MPCORB.DAT", "nonsense\n" * 5)], 3,
     "MPCORB.DAT"),
    ("exposure-missing", lambda w: ["exposure", w.path("exp"), "--jobs", "1"], 3, "exp"),
    ("exposure-empty-folder", lambda w: ["exposure", str(w.out), "--jobs", "1"], 3, "out"),
    ("quadrant-missing-exposure", lambda w: ["quadrant", w.path("exp"), "--quadrant", "21"], 3, "exp"),
    ("lightcurve-missing-root", lambda w: ["lightcurve", "150", "33", "--root", w.path("mf")], 3, "mf"),
    ("subtract-reference-without-psf", lambda w: ["subtract", w.solved(), w.solved("ref.fits"), "--out",
                                                  str(w.out)], 3, "ref.fits"),
    # a reference made elsewhere is characterised on the fly: one without a star cannot be
    ("subtract-reference-without-stars", lambda w: ["subtract", w.solved(), w.solved("ref.fits", MAGZP=27.0),
                                                    "--out", str(w.out)], 3, "ref.fits"),
    ("reference-import-missing", lambda w: ["reference", "import", w.path("coadd.fits"), "--out", str(w.out)], 3,
     "coadd.fits"),
    ("reference-import-without-stars", lambda w: ["reference", "import", w.solved("coadd.fits", MAGZP=27.0), "--out",
                                                  str(w.out)], 3, "coadd.fits"),
    ("reference-import-without-magzp", lambda w: ["reference", "import", w.solved("coadd.fits"), "--out",
                                                  str(w.out)], 3, "MAGZP"),
    ("alerts-publish-corrupt-qa", lambda w: ["alerts", "publish", _folder_with(w, "qa.json", "{broken"), "--spool",
                                             w.path("spool"), "--history", w.path("h.sqlite")], 3, "qa.json"),
    ("alerts-publish-science-gone", lambda w: ["alerts", "publish", _folder_with(
        w, "qa.json", '{"science": "%s", "reference": "%s"}' % (w.path("gone.fits"), w.good)), "--spool",
        w.path("spool"), "--history", w.path("h.sqlite")], 3, "gone.fits"),
    ("matchfile-append-corrupt-qa", lambda w: ["matchfile", "append", _folder_with(w, "qa.json", "{broken"),
                                               "--root", w.path("mf")], 3, "qa.json"),
    ("candidates-list-corrupt-table", lambda w: ["candidates", "list", _folder_with(w, "candidates.ecsv", "# %ECSV x",
                                                                                   qa="{}")], 3, "candidates.ecsv"),
    ("exposure-summary-missing", lambda w: ["exposure-summary", w.path("exp")], 3, "exp"),
    ("submit-missing-exposure", lambda w: ["submit", w.path("exp")], 3, "exp"),
    ("reference-build-corrupt-frame", lambda w: ["reference", "build", w.write("frame.fits", b"SIMPLE  = junk"),
                                                 "--refcat", w.path("gaia"), "--out", str(w.out)], 3, "frame.fits"),
    ("priors-build-table-without-columns", lambda w: ["priors", "build", _table(w, "m.fits"), "--out",
                                                      str(w.out / "prior.fits")], 3, "m.fits"),
    # Palomar never sees declination -80: TELRA/TELDEC at OBSMJD are below the horizon
    ("astrometry-field-below-horizon", _astrometry(lambda w: w.image("h.fits", TELDEC=-80.0)), 3,
     "h.fits: the header is inconsistent with the sky: TELRA = 150, TELDEC = -80 is"),
    ("astrometry-refcat-not-a-catalogue", lambda w: ["astrometry", w.solved(), "--refcat", str(w.good), "--out",
                                                     str(w.out)], 3, "good.fits"),
]

HEADERS = [(f"header-missing-{key}", _astrometry(lambda w, key=key: w.image("h.fits", **{key: None})), 3, key)
           for key in sorted(REQUIRED_KEYWORDS)] + [
    (f"header-bad-{key}", _astrometry(lambda w, key=key, value=value: w.image("h.fits", **{key: value})), 3, key)
    for key, value in [("CCDID", 17), ("QID", 0), ("FILTER", "ZTF_x"), ("FILTERID", 3), ("EXPTIME", 0.0),
                       ("TELRA", 400.0), ("TELDEC", -95.0), ("AIRMASS", 0.5), ("GAIN", -1.0), ("READNOI", -1.0),
                       ("SATURATE", 0.0), ("EXPTIME", "thirty"), ("FIELDID", 6.5), ("CCDID", True)]]

CONFIGS = [
    ("config-unknown-section", _toml("[nosuch]\nx = 1\n"), 2, "nosuch"),
    ("config-unknown-key", _toml("[astrometry]\nmax_rms_ma = 5\n"), 2, "max_rms_ma"),
    ("config-wrong-type", _toml("[astrometry]\nmax_rms_mas = \"fast\"\n"), 2, "max_rms_mas"),
    ("config-negative-limit", _toml("[astrometry]\nmax_rms_mas = -5\n"), 2, "max_rms_mas"),
    ("config-malformed-toml", _toml("[astrometry\nmax_rms_mas = 5\n"), 2, "bad.toml"),
    ("config-stage-setting-misplaced", _toml("[subtraction.extraction]\nthresh = 3\n"), 2, "extraction"),
    ("config-missing-file", lambda w: ["config", "--config", w.path("none.toml")], 2, "none.toml"),
    ("config-is-a-directory", lambda w: ["config", "--config", str(w.out)], 2, "out"),
    ("config-bad-bootstrap", _toml("[kafka]\nbootstrap_servers = \"localhost\"\n"), 2, "bootstrap_servers"),
    ("config-bad-site", _toml("[site]\nlatitude_deg = 123\n"), 2, "latitude_deg"),
]

USAGE = [
    ("quadrants-reversed-range", lambda w: ["exposure", str(w.out), "--quadrants", "5-2"], 2, "--quadrants"),
    ("quadrants-out-of-range", lambda w: ["exposure", str(w.out), "--quadrants", "64"], 2, "--quadrants"),
    ("bootstrap-malformed", lambda w: ["alerts", "replay", "--bootstrap", "nohostport", "--spool", w.path("s")], 2,
     "--bootstrap"),
    ("lightcurve-dec-out-of-range", lambda w: ["lightcurve", "150", "95", "--root", str(w.out)], 2, "dec"),
    ("lightcurve-negative-radius", lambda w: ["lightcurve", "150", "33", "--radius", "-1", "--root", str(w.out)], 2,
     "radius"),
    ("simulate-bad-field", lambda w: ["simulate", "--out", str(w.out), "--fields", "x:y"], 2, "--fields"),
    ("simulate-bad-night", lambda w: ["simulate", "--out", str(w.out), "--start-night", "15/03/2026"], 2,
     "--start-night"),
    ("catalogs-prefetch-no-region", lambda w: ["catalogs", "prefetch", "--from-table", str(w.good), "--store",
                                               str(w.out)], 2, "--field"),
    ("solarsystem-prepare-bad-night", lambda w: ["solarsystem", "prepare", "--night", "tomorrow"], 2, "--night"),
    ("candidates-show-non-integer-id", lambda w: ["candidates", "show", str(w.out), "first"], 2, "ID"),
    ("lightcurve-bad-format", lambda w: ["lightcurve", "150", "33", "--format", "xls"], 2, "--format"),
    ("bench-unknown", lambda w: ["bench", "nosuch"], 2, "nosuch"),
    ("config-paths-root-not-a-string", _toml("[paths]\nroot = 5\n"), 2, "root"),
]

QUERIES = [
    ("query-unknown-parameter", "POS=CIRCLE 150 33 0.01&COLOUR=red", "COLOUR"),
    ("query-bad-id", "ID=abc", "ID"),
    ("query-negative-id", "ID=-5", "ID"),
    ("query-not-a-circle", "POS=BOX 150 33 0.01", "POS"),
    ("query-dec-out-of-range", "POS=CIRCLE 150 95 0.01", "dec"),
    ("query-radius-too-large", "POS=CIRCLE 150 33 5", "radius"),
    ("query-neither-id-nor-pos", "BANDNAME=g", "ID or POS"),
    ("query-bad-band", "POS=CIRCLE 150 33 0.01&BANDNAME=u", "BANDNAME"),
    ("query-bad-format", "POS=CIRCLE 150 33 0.01&FORMAT=XLS", "FORMAT"),
    ("query-huge-mask", "POS=CIRCLE 150 33 0.01&BAD_CATFLAGS_MASK=99999999999999999999999", "BAD_CATFLAGS_MASK"),
    ("query-negative-nobs", "POS=CIRCLE 150 33 0.01&NOBS_MIN=-1", "NOBS_MIN"),
    ("query-bad-mag-range", "POS=CIRCLE 150 33 0.01&MAG=20", "MAG"),
]


def _sqlite_history(w) -> str:
    from alerts.history import SQLiteHistoryStore
    SQLiteHistoryStore(w.root / "h.sqlite").close()
    return w.path("h.sqlite")


#: No server listens on loopback port 1: the connection is refused at once.  The password
#: must never reach the message (it is asserted absent in every case).
_DOWN_URL = "postgresql://u:secretpw@127.0.0.1:1/history"
HISTORY = [
    ("history-url-not-postgresql", _toml('[history]\nurl = "mysql://h/db"\n'), 2, "history: url"),
    ("history-url-bad-port", _toml('[history]\nurl = "postgresql://h:99999/db"\n'), 2, "history: url"),
    ("history-migrate-missing-sqlite", lambda w: ["history", "migrate", w.path("h.sqlite"), "--to", _DOWN_URL], 3,
     "h.sqlite"),
    ("history-migrate-not-sqlite", lambda w: ["history", "migrate", w.write("j.sqlite", "junk\n"), "--to",
                                              _DOWN_URL], 3, "j.sqlite"),
    ("history-migrate-not-a-history", lambda w: ["history", "migrate", _table_sqlite(w), "--to", _DOWN_URL], 3,
     "other.sqlite"),
    ("history-migrate-no-target", lambda w: ["history", "migrate", _sqlite_history(w)], 2, "--to"),
    ("history-migrate-bad-target", lambda w: ["history", "migrate", _sqlite_history(w), "--to", "http://h/db"], 2,
     "--to"),
    ("history-migrate-server-down", lambda w: ["history", "migrate", _sqlite_history(w), "--to", _DOWN_URL], 75,
     "postgresql://u:***@127.0.0.1:1/history"),
    ("history-order-wait-not-positive", _toml('[history]\norder_wait_s = 0\n'), 2, "order_wait_s"),
    # submit announces the quadrants to the history before queueing anything: a server that
    # is down stops it with exit 75 before any job exists.
    ("submit-history-down", lambda w: ["submit", _exposure_folder(w), "--config", w.write(
        "down.toml", f'[paths]\nroot = "{w.root}"\n[history]\nurl = "{_DOWN_URL}"\n')], 75,
     "postgresql://u:***@127.0.0.1:1/history"),
]


def _exposure_folder(w) -> str:
    """An exposure folder holding one valid quadrant (with its RCID and a raw WCS, as exposures'
    files have)."""
    from pipeline.core.image import rcid_of
    header = _header(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=150.0, CRVAL2=30.0, CRPIX1=25.0, CRPIX2=20.0,
                     CDELT1=-0.000281, CDELT2=0.000281)
    header["RCID"] = rcid_of(header["CCDID"], header["QID"])
    folder = w.root / "exposure"
    folder.mkdir(exist_ok=True)
    _image(folder / "q.fits", header)
    return str(folder)


def _table_sqlite(w) -> str:
    import sqlite3
    with sqlite3.connect(w.root / "other.sqlite") as db:
        db.execute("CREATE TABLE t (a INTEGER)")
    return w.path("other.sqlite")


CASES = FILES + HEADERS + CONFIGS + USAGE + HISTORY


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    """cli.main installs its stderr handler once per process: bind it to this test's stderr."""
    root = logging.getLogger()
    stale = [h for h in root.handlers if getattr(h, "_skydiff", False)]
    for handler in stale:
        root.removeHandler(handler)
    yield
    for handler in [h for h in root.handlers if getattr(h, "_skydiff", False)]:
        root.removeHandler(handler)
    for handler in stale:
        root.addHandler(handler)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_the_matrix_is_large_enough():
    assert len(CASES) + len(QUERIES) >= 60


@pytest.mark.parametrize("name, make_argv, status, named", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, make_argv, status, named, tmp_path, caplog, capsys):
    world = World(tmp_path)
    argv = make_argv(world)
    before = _tree(tmp_path)
    if "--config" not in argv:
        argv = argv[:2] + ["--config", str(world.config)] + argv[2:] if argv[0] in _NESTED else \
            argv[:1] + ["--config", str(world.config)] + argv[1:]
    caplog.set_level(logging.INFO)
    try:
        code = cli.main(argv)
    except SystemExit as exc:          # argparse's own usage errors
        code = exc.code
    captured = capsys.readouterr()
    text = caplog.text + captured.err + captured.out
    assert code == status, f"{name}: exit {code}, expected {status}\n{text}"
    assert code in EXIT_TABLE
    assert named in text, f"{name}: the message does not name {named!r}:\n{text}"
    assert "Traceback" not in text
    assert "secretpw" not in text, f"{name}: a password reached the output"
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, f"{name}: an earlier file changed"


_NESTED = {"history", "reference", "priors", "matchfile", "alerts", "candidates", "realbogus", "qa", "catalogs", "solarsystem"}


@pytest.mark.parametrize("name, query, named", QUERIES, ids=[q[0] for q in QUERIES])
def test_bad_query(name, query, named):
    """The light-curve service's queries: a 400 (bad input, 3) naming the parameter."""
    from pipeline.matchfile.service import QueryError, parse_query
    with pytest.raises(QueryError) as error:
        parse_query(parse_qs(query, keep_blank_values=True))
    assert exit_status_of(error.value) == 3 and named in str(error.value)
