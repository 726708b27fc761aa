"""The on-disk index directory: SQLite metadata, per-chunk vector files, FAISS indexes.

Layout of INDEX_DIR::

    meta.sqlite              items (path, image id), captions, skipped files, chunks, meta
    vectors/chunk-000001.npz image (+ caption) embeddings of one committed chunk, with their ids
    images.faiss             FAISS index over image embeddings (ids = items.id)
    captions.faiss           FAISS index over caption embeddings (ids = captions.id), if any
    query_bank-DIGEST.npy    embeddings of the query bank's texts, if the index has one (`index build
                             --query-bank`): images.faiss then holds each image's bias as one more column

The chunk files are the source of truth for vectors; FAISS indexes are derived from them, so
changing the index type or recovering from a crash never needs the model again. A chunk is
committed by writing its .npz atomically and then inserting its rows in one SQLite
transaction: a crash leaves either the whole chunk or an unreferenced file that the next build
overwrites.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from typing_extensions import Self

from ..files import atomic_path

FORMAT = "unialign-search-index/1"
DB_NAME = "meta.sqlite"
VECTORS_DIR = "vectors"
IMAGE_INDEX = "images.faiss"
CAPTION_INDEX = "captions.faiss"
QUERY_BANK = "query_bank-{}.npy"  # the bank's digest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    file TEXT NOT NULL UNIQUE,
    n_images INTEGER NOT NULL,
    n_captions INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    image_id INTEGER,
    chunk INTEGER NOT NULL REFERENCES chunks(id)
);
CREATE TABLE IF NOT EXISTS captions (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    caption TEXT NOT NULL,
    chunk INTEGER NOT NULL REFERENCES chunks(id)
);
CREATE INDEX IF NOT EXISTS captions_by_item ON captions(item_id);
CREATE TABLE IF NOT EXISTS skipped (path TEXT PRIMARY KEY, reason TEXT NOT NULL);
"""


class SearchIndexError(ValueError):
    """An unusable index directory or a request it cannot serve; the message names the path."""


@dataclass(frozen=True)
class Item:
    id: int
    path: str
    image_id: int | None
    caption: str | None  # the first caption, for display


@dataclass(frozen=True)
class Chunk:
    id: int
    file: str
    n_images: int
    n_captions: int


@dataclass(frozen=True)
class ChunkVectors:
    image_ids: np.ndarray
    images: np.ndarray
    caption_ids: np.ndarray
    captions: np.ndarray


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None)  # explicit BEGIN/COMMIT below
        conn.execute("PRAGMA journal_mode=WAL")  # the server keeps reading while a build commits
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class IndexStore:
    """Read and write access to one index directory (one writer at a time, enforced by a lock)."""

    def __init__(self, root: Path | str, readonly: bool = True) -> None:
        self.root = Path(root)
        self.readonly = readonly
        db = self.root / DB_NAME
        if readonly:
            if not db.is_file():
                raise SearchIndexError(f"{self.root} is not a search index (no {DB_NAME}); "
                                       f"create one with `unialign index build --output {self.root}`")
        else:
            if self.root.exists() and not self.root.is_dir():
                raise SearchIndexError(f"--output {self.root} exists and is not a directory")
            if self.root.is_dir() and any(self.root.iterdir()) and not db.is_file():
                raise SearchIndexError(f"--output {self.root} is a non-empty directory that is not a search index "
                                       f"(no {DB_NAME}); choose an empty or new directory")
            (self.root / VECTORS_DIR).mkdir(parents=True, exist_ok=True)
        self._lock_file = None
        if not readonly:
            self._lock_file = open(self.root / ".build.lock", "w")  # noqa: SIM115 - held while the store is open
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                raise SearchIndexError(f"another `index build` is running on {self.root}") from None
        self.conn = _connect(db, readonly)
        self._read_lock = threading.Lock()  # one connection shared by the server's worker threads
        if not readonly:
            self.conn.executescript(_SCHEMA)
        stored = self.meta().get("format")
        if stored is not None and stored != FORMAT:
            raise SearchIndexError(f"{db}: index format {stored!r} is not supported (expected {FORMAT!r})")

    def close(self) -> None:
        self.conn.close()
        if self._lock_file is not None:
            self._lock_file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._read_lock:
            return self.conn.execute(sql, params).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (including KeyboardInterrupt)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- metadata ---------------------------------------------------------------------------

    def meta(self) -> dict[str, str]:
        return dict(self._query("SELECT key, value FROM meta"))

    def set_meta(self, values: dict[str, str]) -> None:
        with self.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items()))

    def write_query_bank(self, digest: str, vectors: np.ndarray) -> None:
        """Stored under its digest, so the meta row that names it is the switch from an old bank to a new one."""
        with atomic_path(self.root / QUERY_BANK.format(digest[:16]), fsync=True) as tmp, open(tmp, "wb") as f:
            np.save(f, vectors.astype(np.float32, copy=False))

    def remove_other_query_banks(self) -> None:
        keep = QUERY_BANK.format(self.meta().get("query_bank_sha256", "")[:16])
        for f in self.root.glob(QUERY_BANK.format("*")):
            if f.name != keep:
                f.unlink()

    def read_query_bank(self) -> np.ndarray | None:
        """The bank's text embeddings, or None for an index without a query bank."""
        digest = self.meta().get("query_bank_sha256")
        if digest is None:
            return None
        path = self.root / QUERY_BANK.format(digest[:16])
        try:
            return np.load(path)
        except (OSError, ValueError) as err:
            raise SearchIndexError(f"{path}: cannot read the query bank ({err}); run `unialign index build` with "
                                   f"--query-bank again") from None

    # -- chunks -----------------------------------------------------------------------------

    def chunks(self) -> list[Chunk]:
        return [Chunk(*row) for row in self._query("SELECT id, file, n_images, n_captions FROM chunks ORDER BY id")]

    def known_paths(self) -> set[str]:
        return {row[0] for row in self._query("SELECT path FROM items")}

    def remove_orphan_vectors(self) -> int:
        """Delete vector files (and temp files) no committed chunk refers to: leftovers of a crash."""
        referenced = {c.file for c in self.chunks()}
        removed = 0
        for f in (self.root / VECTORS_DIR).iterdir():
            if f.name not in referenced:
                f.unlink()
                removed += 1
        return removed

    def commit_chunk(self, paths: list[str], image_ids: list[int | None], image_vectors: np.ndarray,
                     captions: list[tuple[int, str]], caption_vectors: np.ndarray,
                     skipped: list[tuple[str, str]]) -> Chunk:
        """Store one chunk: ``captions`` are (row in ``paths``, text); ``skipped`` (path, reason).

        Ids are assigned inside the write transaction, so the vector file and the rows agree.
        """
        with self.transaction() as c:
            chunk_id = c.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM chunks").fetchone()[0]
            first_item = c.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM items").fetchone()[0]
            first_caption = c.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM captions").fetchone()[0]
            item_ids = np.arange(first_item, first_item + len(paths), dtype=np.int64)
            caption_ids = np.arange(first_caption, first_caption + len(captions), dtype=np.int64)
            name = f"chunk-{chunk_id:06d}.npz"
            self._write_vectors(name, ChunkVectors(item_ids, image_vectors, caption_ids, caption_vectors))
            c.execute("INSERT INTO chunks (id, file, n_images, n_captions) VALUES (?, ?, ?, ?)",
                      (chunk_id, name, len(paths), len(captions)))
            c.executemany("INSERT INTO items (id, path, image_id, chunk) VALUES (?, ?, ?, ?)",
                          [(int(i), p, iid, chunk_id) for i, p, iid in zip(item_ids, paths, image_ids)])
            c.executemany("INSERT INTO captions (id, item_id, caption, chunk) VALUES (?, ?, ?, ?)",
                          [(int(cid), int(item_ids[row]), text, chunk_id)
                           for cid, (row, text) in zip(caption_ids, captions)])
            c.executemany("DELETE FROM skipped WHERE path = ?", [(p,) for p in paths])
            c.executemany("INSERT OR REPLACE INTO skipped (path, reason) VALUES (?, ?)", skipped)
        return Chunk(chunk_id, name, len(paths), len(captions))

    def record_skipped(self, skipped: list[tuple[str, str]]) -> None:
        """(path, reason) of files left out of the index, without a chunk: a build that embeds
        nothing must not leave an empty vector file behind."""
        with self.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO skipped (path, reason) VALUES (?, ?)", skipped)

    def _write_vectors(self, name: str, v: ChunkVectors) -> None:
        with atomic_path(self.root / VECTORS_DIR / name, fsync=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, image_ids=v.image_ids, images=v.images.astype(np.float32, copy=False),
                     caption_ids=v.caption_ids, captions=v.captions.astype(np.float32, copy=False))

    def read_vectors(self, chunk: Chunk) -> ChunkVectors:
        path = self.root / VECTORS_DIR / chunk.file
        try:
            with np.load(path) as z:
                v = ChunkVectors(z["image_ids"], z["images"], z["caption_ids"], z["captions"])
        except (OSError, KeyError, ValueError) as err:
            raise SearchIndexError(f"{path}: cannot read vectors of chunk {chunk.id} ({err})") from None
        if len(v.image_ids) != chunk.n_images or len(v.caption_ids) != chunk.n_captions:
            raise SearchIndexError(f"{path}: holds {len(v.image_ids)} image / {len(v.caption_ids)} caption vectors, "
                                   f"SQLite expects {chunk.n_images} / {chunk.n_captions}")
        return v

    # -- lookups for queries ----------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        (items,), = self._query("SELECT COUNT(*) FROM items")
        (captions,), = self._query("SELECT COUNT(*) FROM captions")
        (skipped,), = self._query("SELECT COUNT(*) FROM skipped")
        return {"items": items, "captions": captions, "skipped": skipped}

    def items(self, ids: list[int]) -> dict[int, Item]:
        """Items by id, each with its first caption (one query for the whole result list)."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._query(
            f"SELECT i.id, i.path, i.image_id, (SELECT caption FROM captions c WHERE c.item_id = i.id "
            f"ORDER BY c.id LIMIT 1) FROM items i WHERE i.id IN ({marks})", tuple(ids))
        return {row[0]: Item(*row) for row in rows}

    def captions(self, ids: list[int]) -> dict[int, tuple[int, str]]:
        """caption id -> (item id, caption text)."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._query(f"SELECT id, item_id, caption FROM captions WHERE id IN ({marks})", tuple(ids))
        return {cid: (item_id, text) for cid, item_id, text in rows}

    def skipped(self) -> list[tuple[str, str]]:
        return self._query("SELECT path, reason FROM skipped ORDER BY path")
