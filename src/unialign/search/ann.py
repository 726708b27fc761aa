"""FAISS index construction and tuning, shared by `index build`, the query side and bench/search.py.

All vectors are L2-normalised embeddings, so inner product is cosine similarity and every
index uses METRIC_INNER_PRODUCT. Ids are the SQLite item/caption ids (``add_with_ids``), so
FAISS never has to agree with SQLite on row order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from ..files import atomic_path

IndexKind = Literal["flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")

# Up to this many vectors an exact scan meets the 20 ms p99 goal (50k x 768: ~16 ms p99 on a
# 2-core VM, docs/SEARCH.md) and exact results need no tuning, so "auto" picks flat.
FLAT_MAX = 50_000
# k-means on every vector of a million-image collection costs minutes on a laptop; this many
# training points per list gives stable centroids (FAISS itself warns below 39).
TRAIN_POINTS_PER_LIST = 64
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 96


@dataclass(frozen=True)
class AnnParams:
    """What kind of index to build and how to search it."""

    kind: IndexKind
    nlist: int = 0  # ivf: number of inverted lists
    nprobe: int = 0  # ivf: lists scanned per query
    hnsw_m: int = 0  # hnsw: graph degree
    ef_search: int = 0  # hnsw: candidate list size per query

    def describe(self) -> str:
        if self.kind == "ivf":
            return f"IVF{self.nlist},Flat nprobe={self.nprobe}"
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m},Flat efSearch={self.ef_search}"
        return "Flat (exact)"

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def ivf_nlist(n: int) -> int:
    """About 2*sqrt(n) lists, as a power of two: ~2k for 1M vectors, so a probe scans a few
    hundred vectors and the coarse quantizer stays cheap."""
    return int(min(65536, max(16, 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n)))))))


def default_nprobe(nlist: int) -> int:
    """Scan 1/32 of the lists (at least 8): recall@10 ~0.99 on clustered vectors at 1M x 768
    for ~7 ms p99 on 2 cores (docs/SEARCH.md); `--nprobe` trades one for the other."""
    return max(8, min(nlist, nlist // 32))


def choose_params(n: int, kind: str = "auto", nprobe: int | None = None, ef_search: int | None = None) -> AnnParams:
    """Index parameters for ``n`` vectors; ``kind="auto"`` is exact up to FLAT_MAX, IVF above."""
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX else "ivf"
    if kind == "flat":
        return AnnParams("flat")
    if kind == "ivf":
        # IVF needs enough training points per list; small collections get fewer lists.
        nlist = min(ivf_nlist(n), max(1, n // 39))
        return AnnParams("ivf", nlist=nlist, nprobe=min(nlist, nprobe or default_nprobe(nlist)))
    if kind == "hnsw":
        return AnnParams("hnsw", hnsw_m=HNSW_M, ef_search=ef_search or HNSW_EF_SEARCH)
    raise ValueError(f"index type must be one of auto, {', '.join(INDEX_KINDS)}; got {kind!r}")


def create(dim: int, params: AnnParams, train: np.ndarray | None = None, seed: int = 0) -> faiss.Index:
    """An empty index ready for ``add_with_ids`` (IVF is trained on a sample of ``train``)."""
    if params.kind == "flat":
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    if params.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index = faiss.IndexIDMap(hnsw)
        configure(index, params)
        return index
    if train is None or len(train) < params.nlist:
        raise ValueError(f"IVF with nlist={params.nlist} needs at least {params.nlist} training vectors, "
                         f"got {0 if train is None else len(train)}")
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
    sample_size = min(len(train), params.nlist * TRAIN_POINTS_PER_LIST)
    rows = np.random.default_rng(seed).choice(len(train), sample_size, replace=False)
    ivf.train(np.ascontiguousarray(train[np.sort(rows)], dtype=np.float32))
    configure(ivf, params)
    return ivf


def build(vectors: np.ndarray, ids: np.ndarray, params: AnnParams) -> faiss.Index:
    index = create(vectors.shape[1], params, train=vectors if params.kind == "ivf" else None)
    add(index, vectors, ids)
    return index


def add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                           np.ascontiguousarray(ids, dtype=np.int64))


def params_of(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> AnnParams:
    """Recover the parameters of a loaded index; search-time knobs take the given overrides
    (or the defaults), since FAISS files do not keep them."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexIVF):
        return AnnParams("ivf", nlist=inner.nlist, nprobe=min(inner.nlist, nprobe or default_nprobe(inner.nlist)))
    if isinstance(inner, faiss.IndexHNSW):
        m = inner.hnsw.nb_neighbors(1)  # type: ignore[attr-defined]  # SWIG method missing from the stubs
        return AnnParams("hnsw", hnsw_m=m, ef_search=ef_search or HNSW_EF_SEARCH)
    return AnnParams("flat")


def configure(index: faiss.Index, params: AnnParams) -> None:
    """Apply the search-time knobs (nprobe / efSearch) to ``index``."""
    space = faiss.ParameterSpace()
    if params.kind == "ivf":
        space.set_index_parameter(index, "nprobe", params.nprobe)
    elif params.kind == "hnsw":
        space.set_index_parameter(index, "efSearch", params.ef_search)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of shape (n_queries, min(k, ntotal)); an id of -1 means fewer hits were found.

    A single query runs on one OpenMP thread: splitting one scan across threads costs more than
    it saves (2-core VM, flat 20k x 768: 29 ms on 2 threads, 3.5 ms on 1), and concurrent
    requests already use the other cores. libgomp keeps the setting per calling thread, so this
    neither races with other threads nor outlives the call.
    """
    k = max(1, min(k, index.ntotal))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(queries) != 1:
        return index.search(queries, k)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k)
    finally:
        faiss.omp_set_num_threads(threads)


def write_atomic(index: faiss.Index, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a reader (or a crash)
    sees the old index or the new one, never half a file."""
    with atomic_path(path, fsync=True) as tmp:
        faiss.write_index(index, str(tmp))


def read(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))
