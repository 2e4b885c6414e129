"""The fold step's Slurm job, as ``skydiff submit`` asks for it, with a fake ``sbatch`` (no
Slurm runs): after every task of the array, a singleton under one fixed name, not held."""
from __future__ import annotations

import subprocess

import pytest
from astropy.io import fits

import slurm.submit as submit
from slurm.jobs import SlurmError


@pytest.fixture
def fake_slurm(monkeypatch):
    calls = []

    def run_slurm(argv, timeout_s=30.0):
        calls.append(list(argv))
        if argv[0] == "sbatch" and any(a.endswith("fold.sbatch") for a in argv) and fail:
            raise SlurmError("sbatch failed: fake")
        return f"{100 + len(calls)}\n" if argv[0] == "sbatch" else ""

    fail = []
    monkeypatch.setattr(submit, "run_slurm", run_slurm)
    return calls, fail


def _options(argv) -> dict:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_the_fold_job_follows_the_array_as_a_singleton(tmp_path, cfg, fake_slurm):
    calls, _ = fake_slurm
    exposure = tmp_path / "exp.fits"
    fits.PrimaryHDU().writeto(exposure)
    result = submit.submit_exposure(exposure, cfg.replace(paths__root=str(tmp_path)), [0, 5], hold=True)
    array, summary, fold = calls
    assert (result.array_job_id, result.summary_job_id, result.fold_job_id) == (101, 102, 103)
    assert "--hold" in array and "--hold" in summary and "--hold" not in fold   # the fold waits on the array
    options = _options(fold)
    assert options["job-name"] == submit.FOLD_JOB_NAME
    assert options["dependency"] == "afterany:101_0:101_5,singleton"
    assert _options(summary)["dependency"] == "afterany:101_0:101_5"
    script = next(a for a in fold if a.endswith(".sbatch"))
    assert script.endswith("fold.sbatch")
    assert fold[fold.index(script) + 1:] == [submit.skydiff_executable(), "matchfile", "fold", "--config",
                                             str(result.workdir / "config.toml")]
    assert subprocess.run(["bash", "-n", script]).returncode == 0


def test_a_failed_fold_submission_cancels_the_exposure(tmp_path, cfg, fake_slurm):
    calls, fail = fake_slurm
    fail.append(True)
    exposure = tmp_path / "exp.fits"
    fits.PrimaryHDU().writeto(exposure)
    with pytest.raises(SlurmError):
        submit.submit_exposure(exposure, cfg.replace(paths__root=str(tmp_path)), [0])
    assert calls[-1] == ["scancel", "102", "101"]


def test_no_fold_job_when_asked(tmp_path, cfg, fake_slurm):
    calls, _ = fake_slurm
    exposure = tmp_path / "exp.fits"
    fits.PrimaryHDU().writeto(exposure)
    result = submit.submit_exposure(exposure, cfg.replace(paths__root=str(tmp_path)), [0], fold=False)
    assert len(calls) == 2 and result.fold_job_id is None
