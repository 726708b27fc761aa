"""Atomic file writes: a reader, or a crash, finds the old file or the new one, never half of one.

Every file unialign writes for later use (checkpoints, configs, summaries, reports, caches,
indexes) goes through :func:`atomic_path`: the data is written under a temporary name in the
same folder and renamed onto the final name only when the writer finished without error.
:func:`file_sha256` is the one content hash of a file (checkpoints, asset sources).
"""

from __future__ import annotations

import errno
import hashlib
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

# Errors of the storage rather than of the program: the user must free space or fix permissions, so
# they get one line naming the file instead of a traceback through torch.save or Lightning.
_STORAGE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}


class WriteError(OSError):
    """A file could not be written because of its storage (full, read-only, no permission).

    An ``OSError`` with the original ``errno``, so callers that handle ``OSError`` still do; its
    message is one line naming the file and the cause."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def storage_error(err: OSError, path: str | Path) -> WriteError | None:
    """The :class:`WriteError` for a full / read-only / forbidden `path`, or None for other errors.

    ``torch.save`` wraps a failed write in a ``RuntimeError`` whose ``__cause__`` or
    ``__context__`` is the ``OSError``: both are looked at."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, WriteError):
            return seen
        if isinstance(seen, OSError) and seen.errno in _STORAGE_ERRORS:
            reason = _STORAGE_ERRORS[seen.errno]
            return WriteError(seen.errno, f"cannot write {path}: {reason} ({seen.strerror or seen})")
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; rename it onto ``path`` when the block ends
    cleanly, delete it when the block raises.

    The temporary name ends in ``.tmp`` (so globs for the real extension never pick up a
    leftover of a killed process): writers that choose a format by file name need it given
    (``savefig(tmp, format="png")``, ``np.save`` to an open file). ``fsync`` flushes the data to
    disk before the rename, for files that must also survive a power loss. The file gets the
    permissions a plain ``open()`` would have given it.

    A full disk, a read-only folder or a missing permission raises :class:`WriteError` (one line
    naming ``path`` and the cause); a killed process can still leave the temporary file, which
    :func:`remove_stale_temp_files` clears.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        clear = storage_error(err, path)
        if clear is None:
            raise
        raise clear from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        clear = storage_error(err, path) if isinstance(err, Exception) else None
        if clear is not None and clear is not err:
            raise clear from None
        raise


def temp_files(folder: str | Path) -> list[Path]:
    """Temporary files :func:`atomic_path` leaves in `folder` when its process is killed mid-write."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(".*.tmp") if p.is_file()) if folder.is_dir() else []


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the leftovers of killed writes in `folder` (a checkpoint's can be gigabytes).

    Only call it when no writer of that folder runs (e.g. before a run starts or resumes): a
    live writer's temporary file has the same name shape."""
    removed = []
    for tmp in temp_files(folder):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, memoised per resolved path, size and mtime (checkpoints are
    hundreds of MB and are hashed again by every index build, search and teacher-cache check)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Indented UTF-8 JSON with a final newline."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def hash_tensor(digest: Any, tensor: Any) -> None:
    """Feed a tensor's dtype, shape and values (not its name, device or strides) to a hashlib digest."""
    import torch

    t = tensor.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a Python file object, not a path: torch's own C++ writer reports a
    full disk as "unexpected pos 704 vs 598", this way the OSError (ENOSPC) comes through and
    becomes a :class:`WriteError` naming ``path``."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
