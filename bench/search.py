"""Search benchmarks: ANN query latency + recall against exact search, and a loopback load test.

    python bench/search.py                       # 1,000,000 x 768, the auto index for that size (IVF)
    python bench/search.py --n 200000 --index-type hnsw --json out.json
    python bench/search.py --serve-load          # load test of `unialign serve` on 127.0.0.1
    python bench/search.py --upload-rss          # server RSS under bursts of concurrent 40-Mpixel uploads
    python bench/search.py --query-bank 10000    # also: an index with query-bank normalisation (one more column)

Latency is measured one query at a time (the interactive case); recall@10 of the approximate
index is measured against IndexFlatIP on the same vectors in the same run. Vectors are
L2-normalised like real embeddings. ``--data clustered`` (default) draws them around random
centres the way embeddings of a photo collection bunch into topics; ``--data uniform`` is the
isotropic worst case for any partition- or graph-based index; ``--vectors FILE.npy`` uses real
embeddings (from ``unialign embed``) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from unialign.files import write_json_atomic
from unialign.machine import machine_info

from search_serve import bench_serve, bench_upload_rss, percentiles, print_serve, print_upload_rss


def make_vectors(n: int, dim: int, data: str, clusters: int, rng: np.random.Generator,
                 centres: np.ndarray | None = None, block: int = 100_000) -> np.ndarray:
    """Unit vectors, generated in blocks so 1M x 768 never needs a float64 copy (6 GB)."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        x = rng.standard_normal((stop - start, dim), dtype=np.float32)
        if data == "clustered":
            assert centres is not None
            # centre + noise of the same norm: same-topic pairs have cosine ~0.5, others ~0
            x = centres[rng.integers(0, clusters, stop - start)] + x / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:stop] = x
    return out


def load_vectors(path: Path, n_queries: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Real embeddings (a .npy from `unialign embed`): random rows are held out as queries, so
    recall is measured on the distribution the index will really serve."""
    data = np.load(path, mmap_mode="r")
    if data.ndim != 2 or len(data) <= n_queries:
        raise SystemExit(f"--vectors {path}: need a 2-D array with more than --queries={n_queries} rows, "
                         f"got shape {data.shape}")
    held_out = np.zeros(len(data), dtype=bool)
    held_out[rng.choice(len(data), n_queries, replace=False)] = True
    base, queries = (np.asarray(data[mask], dtype=np.float32) for mask in (~held_out, held_out))
    for x in (base, queries):
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return base, queries


def single_query_latency(index: Any, queries: np.ndarray, k: int) -> list[float]:
    """Seconds per query, one at a time, through the library's search path (`ann.search`)."""
    from unialign.search import ann

    times = []
    for i in range(len(queries)):
        q = queries[i:i + 1]
        t0 = time.perf_counter()
        ann.search(index, q, k)
        times.append(time.perf_counter() - t0)
    return times


def bench_ann(args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    from unialign.search import ann

    host = machine_info()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    if args.vectors:
        base, queries = load_vectors(Path(args.vectors), args.queries, rng)
        args.n, args.dim, args.data = len(base), base.shape[1], f"file {args.vectors}"
    else:
        centres = None
        if args.data == "clustered":
            centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
            centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        base = make_vectors(args.n, args.dim, args.data, args.clusters, rng, centres)
        queries = make_vectors(args.queries, args.dim, args.data, args.clusters, rng, centres)
    log(f"{args.n} x {args.dim} {args.data} vectors ready in {time.perf_counter() - t0:.1f}s")
    ids = np.arange(args.n, dtype=np.int64)

    params = ann.choose_params(args.n, args.index_type, nprobe=args.nprobe, ef_search=args.ef_search)
    t0 = time.perf_counter()
    index = ann.build(base, ids, params)
    build_s = time.perf_counter() - t0
    log(f"built {params.describe()} in {build_s:.1f}s")

    bank_result = None
    if args.query_bank:
        bank = (base[rng.choice(len(base), args.query_bank, replace=False)] if args.vectors
                else make_vectors(args.query_bank, args.dim, args.data, args.clusters, rng, centres))
        bank_result = bench_query_bank(base, ids, queries, bank, params, args)

    exact = faiss.IndexFlatIP(args.dim)
    exact.add(base)
    del base
    t0 = time.perf_counter()
    _, truth = exact.search(queries, args.k)
    log(f"exact ground truth for {args.queries} queries in {time.perf_counter() - t0:.1f}s")

    single_query_latency(index, queries[:20], args.k)  # warm-up
    latency, recall = measure(index, queries, truth, args.k)
    sweep = []
    knob = "nprobe" if params.kind == "ivf" else "ef_search"
    for value in args.sweep if params.kind != "flat" else []:
        ann.configure(index, replace(params, **{knob: value}))
        lat, rec = measure(index, queries, truth, args.k)
        sweep.append({knob: value, "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], f"recall@{args.k}": rec})
    exact_queries = queries[:args.exact_queries]
    exact_times = single_query_latency(exact, exact_queries, args.k)
    return {
        "section": "ann",
        "machine": host,
        "faiss": faiss.__version__,
        "omp_threads": faiss.omp_get_max_threads(),
        "n": args.n, "dim": args.dim, "data": args.data,
        "clusters": args.clusters if args.data == "clustered" and not args.vectors else None,
        "k": args.k, "queries": args.queries,
        "index": params.describe(), "params": params.as_dict(),
        "build_s": round(build_s, 2),
        "latency": latency,
        f"recall@{args.k}": recall,
        "sweep": sweep,
        "exact_latency": percentiles(exact_times), "exact_queries": len(exact_queries),
        "query_bank": bank_result,
    }


def bench_query_bank(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, bank: np.ndarray, params: Any,
                     args: argparse.Namespace) -> dict[str, Any]:
    """What a query bank costs (`unialign index build --query-bank`): the build's extra pass (each vector's
    bias against the bank), and the same kind of index over the vectors with minus their bias as one more
    column, timed one query at a time and scored against exact search of the same biased scores."""
    import faiss
    import torch

    from unialign.evaluation.querybank import querybank_bias
    from unialign.search import ann

    t0 = time.perf_counter()
    bias = querybank_bias(torch.from_numpy(base), torch.from_numpy(bank), args.beta).numpy()
    bias_s = time.perf_counter() - t0
    log(f"biases of {len(base)} vectors against a bank of {len(bank)} in {bias_s:.1f}s")
    vectors = np.concatenate([base, -bias[:, None]], axis=1)
    asked = np.concatenate([queries, np.ones((len(queries), 1), dtype=np.float32)], axis=1)
    t0 = time.perf_counter()
    index = ann.build(vectors, ids, params)
    build_s = time.perf_counter() - t0
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(asked, args.k)
    single_query_latency(index, asked[:20], args.k)  # warm-up
    latency, recall = measure(index, asked, truth, args.k)
    return {"bank": len(bank), "beta": args.beta, "bias_s": round(bias_s, 2), "build_s": round(build_s, 2),
            "latency": latency, f"recall@{args.k}": recall}


def measure(index: Any, queries: np.ndarray, truth: np.ndarray, k: int) -> tuple[dict[str, float], float]:
    """Single-query latency percentiles and recall@k against the exact neighbours ``truth``."""
    times = single_query_latency(index, queries, k)
    _, found = index.search(queries, k)
    recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))
    return percentiles(times), round(recall, 4)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_ann(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"device: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'} (faiss {r['faiss']}, "
          f"{r['omp_threads']} OpenMP threads; load average {m['loadavg_1m']} at start)")
    print(f"N={r['n']:,} dim={r['dim']} data={r['data']}" + (f" ({r['clusters']} clusters)" if r["clusters"] else "")
          + f" k={r['k']} queries={r['queries']}")
    print(f"index: {r['index']} params={r['params']} build={r['build_s']}s")
    lat, ex = r["latency"], r["exact_latency"]
    print(f"approx single-query latency: p50={lat['p50_ms']:.2f} ms p99={lat['p99_ms']:.2f} ms "
          f"mean={lat['mean_ms']:.2f} ms")
    recall_key = f"recall@{r['k']}"
    print(f"{recall_key} vs IndexFlatIP: {r[recall_key]:.4f}")
    for row in r["sweep"]:
        knob, value = next(iter(row.items()))
        print(f"  {knob}={value}: p50={row['p50_ms']:.2f} ms p99={row['p99_ms']:.2f} ms "
              f"{recall_key}={row[recall_key]:.4f}")
    print(f"exact (IndexFlatIP) single-query latency over {r['exact_queries']} queries: "
          f"p50={ex['p50_ms']:.2f} ms p99={ex['p99_ms']:.2f} ms")
    bank = r["query_bank"]
    if bank:
        lat = bank["latency"]
        print(f"with a query bank of {bank['bank']:,} (beta {bank['beta']}): biases {bank['bias_s']}s, "
              f"build {bank['build_s']}s; single-query latency p50={lat['p50_ms']:.2f} ms p99={lat['p99_ms']:.2f} ms; "
              f"{recall_key} vs exact biased search: {bank[recall_key]:.4f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="database vectors")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--index-type", default="auto", choices=["auto", "flat", "ivf", "hnsw"],
                   help="auto = what `unialign index build` picks for N")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists scanned per query (default: library's)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (default: library's)")
    p.add_argument("--sweep", type=lambda s: [int(v) for v in s.split(",")], default=[],
                   help="also measure these nprobe (IVF) / efSearch (HNSW) values on the same index, e.g. 16,64,256")
    p.add_argument("--queries", type=int, default=1000, help="queries for latency and recall")
    p.add_argument("--exact-queries", type=int, default=100, help="queries timed on the exact index")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    p.add_argument("--clusters", type=int, default=10_000, help="topics for --data clustered")
    p.add_argument("--vectors", metavar="NPY", help="benchmark on these embeddings instead (e.g. from `unialign "
                                                    "embed`); --n, --dim and --data are then ignored")
    p.add_argument("--query-bank", type=int, default=0, metavar="M",
                   help="also an index with query-bank normalisation over M bank vectors (like the queries)")
    p.add_argument("--beta", type=float, default=14.3, help="the bank's inverse temperature (a trained model's "
                                                            "logit scale; the demo's S-SMKE: 14.4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write results as JSON ('-' for stdout only)")
    load = p.add_argument_group("service load test (--serve-load)")
    load.add_argument("--serve-load", action="store_true", help="load-test `unialign serve` instead of FAISS")
    load.add_argument("--index", help="index to serve (default: a synthetic one with a tiny model)")
    load.add_argument("--checkpoint", help="model of --index, if it moved since the build")
    load.add_argument("--images", type=int, default=500, help="images in the synthetic index")
    load.add_argument("--requests", type=int, default=2000)
    load.add_argument("--concurrency", type=int, default=4, help="concurrent clients (threads)")
    load.add_argument("--upload-rss", action="store_true",
                      help="server RSS under --bursts of --concurrency concurrent uploads of one --upload-size PNG")
    load.add_argument("--bursts", type=int, default=3)
    load.add_argument("--upload-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(8000, 5000),
                      metavar="WxH", help="pixels of the uploaded PNG (default 8000x5000 = 40 Mpixel, the cap)")
    args = p.parse_args(argv)
    if args.upload_rss:
        emit(bench_upload_rss(args), args.json, print_upload_rss)
    elif args.serve_load:
        result = bench_serve(args)
        emit(result, args.json, print_serve)
        if result["errors"]:
            raise SystemExit(f"{result['errors']} request(s) failed")
    else:
        emit(bench_ann(args), args.json, print_ann)


def emit(result: dict[str, Any], json_path: str | None, printer: Any) -> None:
    if json_path == "-":
        print(json.dumps(result, indent=2))
        return
    printer(result)
    if json_path:
        write_json_atomic(json_path, result)


if __name__ == "__main__":
    main()
