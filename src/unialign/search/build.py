"""`unialign index build`: embed a collection in committed chunks and (re)derive the FAISS indexes.

Running it again on the same directory embeds only files not indexed yet, which is also how an
interrupted build resumes. FAISS indexes are rebuilt from the stored chunk vectors only when
their type or size class changes; otherwise new vectors are appended.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from ..data.images import IMAGE_SUFFIXES
from ..data.records import read_manifest, stable_id
from ..evaluation.encode import encode_images, encode_texts
from ..evaluation.querybank import querybank_bias
from ..evaluation.run import default_device
from ..files import file_sha256
from ..model.factory import load
from . import ann
from .store import (
    CAPTION_INDEX,
    DB_NAME,
    FORMAT,
    IMAGE_INDEX,
    Chunk,
    ChunkVectors,
    IndexStore,
    SearchIndexError,
)

log = logging.getLogger(__name__)

SYMLINK_SKIPPED = "symlink: not followed (only regular files inside the indexed folder are indexed)"


@dataclass(frozen=True)
class Entry:
    """One image to index and the captions that come with it (manifests only)."""

    path: str
    image_id: int | None
    captions: tuple[str, ...] = ()
    skip: str | None = None  # why it is listed as skipped instead of embedded


@dataclass
class BuildReport:
    index_dir: str
    requested: int  # images named by the source
    already_indexed: int
    added: int
    captions_added: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) in this run
    items: int = 0
    captions: int = 0
    image_index: str = ""
    caption_index: str | None = None
    query_bank: int = 0  # queries in the index's bank (0: none)


def entries_from_folder(folder: Path | str) -> list[Entry]:
    """Image files under ``folder`` (recursive, by suffix), in sorted order; image_id hashes the
    path relative to ``folder`` like manifests without an id column do.

    Symlinks (to image files or to directories) are never followed: they come back as entries
    with ``skip`` = SYMLINK_SKIPPED. A link could lead out of the folder, or be pointed
    elsewhere after the build while the server still opens its stored path."""
    root = Path(folder)
    if not root.is_dir():
        raise SearchIndexError(f"--images {root} is not a directory")
    files, links = [], []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            if p.suffix.lower() in IMAGE_SUFFIXES or p.is_dir():
                links.append(Entry(os.path.abspath(p), None, skip=SYMLINK_SKIPPED))
        elif p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            files.append(Entry(os.path.abspath(p), stable_id(p.relative_to(root).as_posix())))
    if not files:
        raise SearchIndexError(f"--images {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
                               + (f"; {len(links)} symlink(s) not followed" if links else ""))
    return files + links


def entries_from_manifest(manifest: Path | str, image_root: Path | str | None = None) -> list[Entry]:
    """One entry per distinct image path of a JSONL/CSV manifest, with all of its captions."""
    records = read_manifest(manifest, image_root).records
    by_path: dict[str, tuple[int, list[str]]] = {}
    for rec in records:
        path = os.path.abspath(rec.image)
        _, captions = by_path.setdefault(path, (rec.image_id, []))
        if rec.caption not in captions:
            captions.append(rec.caption)
    return [Entry(path, image_id, tuple(captions)) for path, (image_id, captions) in by_path.items()]


def _check_model(store: IndexStore, checkpoint: Path, sha: str) -> None:
    """Refuse another model once embeddings exist (an index with none may switch models)."""
    meta = store.meta()
    stored = meta.get("checkpoint_sha256")
    if stored is not None and stored != sha and store.counts()["items"]:
        raise SearchIndexError(
            f"{store.root} holds embeddings of checkpoint {meta.get('checkpoint_path')} (sha256 {stored[:16]}...), "
            f"but --checkpoint {checkpoint} has sha256 {sha[:16]}...; embeddings of different models cannot be "
            f"mixed: build into a new --output directory")


def read_query_texts(path: Path | str) -> list[str]:
    """A query bank's texts: a .txt file (one query a line) or a JSONL/CSV manifest (its captions)."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".csv"):
        texts = [r.caption for r in read_manifest(path).records]
    elif path.suffix.lower() == ".txt":
        try:
            texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise SearchIndexError(f"--query-bank {path}: cannot read ({err})") from None
    else:
        raise SearchIndexError(f"--query-bank {path}: expected a .txt file (one query a line) or a .jsonl/.csv "
                               f"manifest, got {path.suffix or 'no suffix'}")
    if not texts:
        raise SearchIndexError(f"--query-bank {path}: no queries in it")
    return texts


def build_index(checkpoint: Path | str, entries: Sequence[Entry], out: Path | str, index_type: str | None = None,
                batch_size: int = 64, num_workers: int = 0, chunk_size: int = 2048, device: str | None = None,
                progress: bool = True, query_bank: Path | str | None = None) -> BuildReport:
    """Embed the entries not in ``out`` yet, chunk by chunk, then bring the FAISS indexes up to date.

    ``index_type`` None keeps the type chosen by an earlier build ("auto" for a new index). ``query_bank``
    (texts like the queries to expect, e.g. the training captions; `read_query_texts`): text search ranks
    by query-bank normalisation (`evaluation.querybank`); None keeps the bank of an earlier build, if any.
    """
    if chunk_size < 1:
        raise SearchIndexError(f"chunk size must be >= 1, got {chunk_size}")
    if index_type is not None and index_type != "auto" and index_type not in ann.INDEX_KINDS:
        raise SearchIndexError(f"index type must be auto, flat, ivf or hnsw; got {index_type!r}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    sha = file_sha256(checkpoint)
    with IndexStore(out, readonly=False) as store:
        _check_model(store, checkpoint, sha)
        kind = index_type or store.meta().get("index_type", "auto")
        # Recorded before any chunk, so a resumed build is checked against the same model; the
        # path is refreshed on every build, so `search` finds a checkpoint that was moved.
        store.set_meta({"format": FORMAT, "checkpoint_path": str(checkpoint.resolve()), "checkpoint_sha256": sha,
                        "index_type": kind})
        if store.remove_orphan_vectors():
            log.info("%s: removed vector files of a chunk that was never committed", store.root)
        device = device or default_device()
        model = functools.cache(lambda: load(checkpoint, device=device))  # loaded once, if anything needs it
        if query_bank is not None:
            _set_query_bank(store, read_query_texts(query_bank), str(query_bank), sha, model, device)
        known = store.known_paths()
        todo = [e for e in entries if e.skip is None and e.path not in known]
        listed = [(e.path, e.skip) for e in entries if e.skip is not None]
        report = BuildReport(str(store.root), len(entries), len(entries) - len(todo) - len(listed), 0, 0,
                             skipped=listed)
        if listed:
            store.record_skipped(listed)
        if todo:
            _embed(store, model(), todo, batch_size, num_workers, chunk_size, device, progress, report)
        counts = store.counts()
        if not counts["items"]:
            raise SearchIndexError(f"{store.root}: nothing was indexed: all {len(report.skipped)} image(s) were "
                                   f"skipped (listed in table 'skipped' of {store.root / DB_NAME})")
        image_params, caption_params = sync_faiss(store, kind)
        report.query_bank = int(store.meta().get("query_bank_size", 0))
    report.items, report.captions = counts["items"], counts["captions"]
    report.image_index = image_params.describe() if image_params else ""
    report.caption_index = caption_params.describe() if caption_params else None
    return report


def _set_query_bank(store: IndexStore, texts: list[str], source: str, checkpoint_sha: str,
                    model: Callable[[], tuple], device: str) -> None:
    """Embed and store the bank unless the same texts are stored for the same model (the image index is
    rebuilt with the new biases by `sync_faiss`)."""
    digest = hashlib.sha256("\n".join([checkpoint_sha, *texts]).encode("utf-8")).hexdigest()
    if store.meta().get("query_bank_sha256") == digest:
        return
    net, _, tokenizer = model()
    vectors = encode_texts(net, tokenizer, texts, device=device, progress=False)
    beta = float(net.scales()[0].detach())  # the inverse temperature the model trained at
    store.write_query_bank(digest, np.asarray(vectors, dtype=np.float32))
    store.set_meta({"query_bank_sha256": digest, "query_bank_source": source, "query_bank_size": str(len(texts)),
                    "query_bank_beta": repr(beta)})
    store.remove_other_query_banks()
    log.info("query bank: %d queries from %s (beta %.2f)", len(texts), source, beta)


def _embed(store: IndexStore, loaded: tuple, todo: list[Entry], batch_size: int, num_workers: int,
           chunk_size: int, device: str, progress: bool, report: BuildReport) -> None:
    model, preprocess, tokenizer = loaded
    store.set_meta({"dim": str(model.width)})
    n_chunks = (len(todo) + chunk_size - 1) // chunk_size
    for number, start in enumerate(range(0, len(todo), chunk_size), 1):
        chunk = todo[start:start + chunk_size]
        paths = [e.path for e in chunk]
        emb, kept, skipped = encode_images(model, preprocess, paths, batch_size, num_workers, device, progress)
        if not kept:
            store.record_skipped(skipped)
            report.skipped.extend(skipped)
            log.info("chunk %d/%d: all %d image(s) unreadable, nothing committed", number, n_chunks, len(skipped))
            continue
        captions = [(row, text) for row, i in enumerate(kept) for text in chunk[i].captions]
        caption_emb = (encode_texts(model, tokenizer, [t for _, t in captions], device=device, progress=False)
                       if captions else np.empty((0, model.width), dtype=np.float32))
        store.commit_chunk([paths[i] for i in kept], [chunk[i].image_id for i in kept],
                           np.asarray(emb, dtype=np.float32), captions, np.asarray(caption_emb, dtype=np.float32),
                           skipped)
        report.added += len(kept)
        report.captions_added += len(captions)
        report.skipped.extend(skipped)
        log.info("chunk %d/%d committed: %d image(s), %d caption(s), %d unreadable; %d/%d done", number, n_chunks,
                 len(kept), len(captions), len(skipped), start + len(chunk), len(todo))


def sync_faiss(store: IndexStore, kind: str) -> tuple[ann.AnnParams | None, ann.AnnParams | None]:
    """Make images.faiss / captions.faiss cover every committed chunk (written atomically)."""
    chunks = store.chunks()
    meta = store.meta()
    bank = store.read_query_bank()
    beta = float(meta["query_bank_beta"]) if bank is not None else 0.0
    # images.faiss holds the biases of one bank: the one recorded after it was written last
    bank_digest = meta.get("query_bank_sha256", "")
    stale = meta.get("images_faiss_query_bank", "") != bank_digest
    images = _sync_one(store, store.root / IMAGE_INDEX, chunks, "images", kind, bank, beta, rebuild=stale)
    store.set_meta({"images_faiss_query_bank": bank_digest})
    return images, _sync_one(store, store.root / CAPTION_INDEX, chunks, "captions", kind)


def _part(v: ChunkVectors, which: str, bank: np.ndarray | None = None, beta: float = 0.0
          ) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's vectors for one FAISS index; with a query bank an image's last column is minus its bias, so
    that a text query with a last column of 1 scores cosine - bias (and an image query, with 0, the cosine)."""
    if which == "captions":
        return v.captions, v.caption_ids
    if bank is None:
        return v.images, v.image_ids
    bias = querybank_bias(torch.from_numpy(v.images), torch.from_numpy(bank), beta).numpy()
    return np.concatenate([v.images, -bias[:, None]], axis=1), v.image_ids


def _sync_one(store: IndexStore, path: Path, chunks: list[Chunk], which: str, kind: str,
              bank: np.ndarray | None = None, beta: float = 0.0, rebuild: bool = False) -> ann.AnnParams | None:
    counts = [c.n_images if which == "images" else c.n_captions for c in chunks]
    total = sum(counts)
    if total == 0:
        path.unlink(missing_ok=True)
        return None
    want = ann.choose_params(total, kind)
    index, start = (None, 0) if rebuild else _reusable(path, counts, want)
    if index is not None and start == len(chunks):
        return want
    if index is None:
        parts = [_part(store.read_vectors(c), which, bank, beta) for c in chunks]
        index = ann.build(np.concatenate([x for x, _ in parts]), np.concatenate([i for _, i in parts]), want)
        log.info("%s: built %s over %d %s vectors", path.name, want.describe(), total, which)
    else:
        for c in chunks[start:]:
            ann.add(index, *_part(store.read_vectors(c), which, bank, beta))
        log.info("%s: appended %d %s vectors (%d in all)", path.name, sum(counts[start:]), which, index.ntotal)
    ann.write_atomic(index, path)
    return want


def _reusable(path: Path, counts: list[int], want: ann.AnnParams) -> tuple[faiss.Index | None, int]:
    """The existing FAISS index and how many leading chunks it covers, or (None, 0) when it must
    be rebuilt: missing, another kind, an IVF whose list count no longer fits the collection
    (off by 2x or more), or a vector count that is not a chunk boundary (not built from these
    chunks)."""
    if not path.is_file():
        return None, 0
    try:
        index = ann.read(path)
    except RuntimeError as err:
        log.warning("%s is unreadable (%s); rebuilding it from the stored vectors", path, err)
        return None, 0
    have = ann.params_of(index)
    if have.kind != want.kind or (want.kind == "ivf" and not want.nlist / 2 < have.nlist < want.nlist * 2):
        return None, 0
    boundaries = np.flatnonzero(np.cumsum([0, *counts]) == index.ntotal)
    if index.ntotal == 0 or not len(boundaries):
        return None, 0
    return index, int(boundaries[-1])
