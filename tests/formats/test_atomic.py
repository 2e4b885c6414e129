"""The one atomic writer: temporary beside the target, renamed into place, removed on failure."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from pipeline.formats import atomic
from pipeline.formats.atomic import (TEMPORARY_MARK, atomic_path, write_fits_atomic, write_json_atomic,
                                     write_table_atomic, write_text_atomic)


def test_temporary_is_hidden_beside_the_target_and_renamed(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent and temporary.name.startswith(f".out.bin{TEMPORARY_MARK}")
        temporary.write_bytes(b"payload")
        assert not target.exists()
    assert target.read_bytes() == b"payload"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_text_atomic("old", tmp_path / "keep.txt")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_permissions_follow_the_umask_unless_given(tmp_path):
    table = Table({"x": [1, 2]})
    umask = os.umask(0o022)
    try:
        shared = [write_text_atomic("x", tmp_path / "shared.txt"),
                  write_table_atomic(table, tmp_path / "t.ecsv"), write_table_atomic(table, tmp_path / "t.fits")]
        private = write_text_atomic("secret", tmp_path / "private.toml", mode=0o600)
    finally:
        os.umask(umask)
    assert [stat.S_IMODE(path.stat().st_mode) for path in shared] == [0o644] * 3
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_durable_syncs_the_file_then_the_folder(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(atomic, "fsync_file", lambda path: synced.append(("file", str(path))))
    monkeypatch.setattr(atomic, "fsync_directory", lambda path: synced.append(("folder", str(path))))
    target = tmp_path / "index.json"
    write_json_atomic({"a": 1}, target, durable=True)
    assert [kind for kind, _ in synced] == ["file", "folder"]
    assert TEMPORARY_MARK in synced[0][1] and synced[1][1] == str(tmp_path)
    synced.clear()
    write_json_atomic({"a": 1}, target)
    assert synced == []


def test_json_text_and_tables(tmp_path):
    record = {"b": [1, 2], "a": "é"}
    path = write_json_atomic(record, tmp_path / "qa.json")
    assert path.read_text() == json.dumps(record, indent=2) + "\n"
    table = Table({"x": np.arange(3), "y": np.linspace(0.0, 1.0, 3)})
    table.meta["note"] = "kept"
    ecsv = write_table_atomic(table, tmp_path / "t.ecsv")
    reference = tmp_path / "reference.ecsv"
    table.write(reference, format="ascii.ecsv")
    assert ecsv.read_bytes() == reference.read_bytes()
    fits_path = write_table_atomic(table, tmp_path / "t.fits")
    assert list(Table.read(fits_path)["x"]) == [0, 1, 2]


def test_fits_finalize_patches_before_the_rename(tmp_path):
    seen = []

    def finalize(temporary):
        seen.append(temporary.name)
        with fits.open(temporary, mode="update") as hdul:
            hdul[0].header["PATCHED"] = True

    path = write_fits_atomic(fits.HDUList([fits.PrimaryHDU(np.zeros((2, 2)))]), tmp_path / "a.fits", finalize)
    assert seen and seen[0].startswith(f".a.fits{TEMPORARY_MARK}")
    assert fits.getheader(path)["PATCHED"] is True
