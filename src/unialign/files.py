"""Atomic file writes: a reader, or a crash, finds the old file or the new one, never half of one.

Every file unialign writes for later use (checkpoints, configs, summaries, reports, caches,
indexes) goes through :func:`atomic_path`: the data is written under a temporary name in the
same folder and renamed onto the final name only when the writer finished without error.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once: os.umask can only be read by setting it, which is not thread-safe


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; rename it onto ``path`` when the block ends
    cleanly, delete it when the block raises.

    The temporary name ends in ``.tmp`` (so globs for the real extension never pick up a
    leftover of a killed process): writers that choose a format by file name need it given
    (``savefig(tmp, format="png")``, ``np.save`` to an open file). ``fsync`` flushes the data to
    disk before the rename, for files that must also survive a power loss. The file gets the
    permissions a plain ``open()`` would have given it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Indented UTF-8 JSON with a final newline."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
