"""Atomic writes: the old file or the new one, never half of one, and nothing left behind."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from unialign.files import UMASK, atomic_path, write_json_atomic, write_text_atomic


def test_write_replaces_whole_file_with_plain_permissions(tmp_path) -> None:
    target = tmp_path / "deep" / "result.json"  # missing folders are made
    write_json_atomic(target, {"recall": 12.5, "name": "modèle"})
    write_json_atomic(target, {"recall": 13.0})
    assert json.loads(target.read_text(encoding="utf-8")) == {"recall": 13.0}
    assert target.read_text(encoding="utf-8").endswith("}\n")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~UMASK  # not mkstemp's 0600
    assert os.listdir(target.parent) == ["result.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "vectors.npy"
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.save(f, np.arange(3))
    with pytest.raises(RuntimeError, match="killed mid-write"), atomic_path(target, fsync=True) as tmp:
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("killed mid-write")
    assert np.load(target).tolist() == [0, 1, 2]
    assert os.listdir(tmp_path) == ["vectors.npy"]


def test_temporary_names_never_match_the_real_extension(tmp_path) -> None:
    with atomic_path(tmp_path / "chunk.npz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".chunk.npz.") and tmp.suffix == ".tmp"
        assert not list(tmp_path.glob("*.npz"))
        tmp.write_bytes(b"x")
    write_text_atomic(tmp_path / "notes.md", "done\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk.npz", "notes.md"]
