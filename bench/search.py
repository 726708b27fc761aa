"""Search benchmarks: ANN query latency + recall against exact search, and a loopback load test.

    python bench/search.py                       # 1,000,000 x 768, the auto index for that size (IVF)
    python bench/search.py --n 200000 --index-type hnsw --json out.json
    python bench/search.py --serve-load          # load test of `unialign serve` on 127.0.0.1
    python bench/search.py --upload-rss          # server RSS under bursts of concurrent 40-Mpixel uploads

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
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from unialign.files import write_json_atomic
from unialign.machine import machine_info


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max())}


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
    }


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


QUERIES = ["a red square", "a small blue circle", "the green box in the middle", "a yellow shape on the left",
           "purple disc at the top", "an orange triangle", "a big white square", "black circle on the right"]


def tiny_index(root: Path, n_images: int) -> Path:
    """A synthetic collection indexed with a tiny untrained model: a self-contained load test
    that measures the service (HTTP, tokenizer, text tower, FAISS, SQLite), not a real model."""
    import torch
    from PIL import Image, ImageDraw
    from transformers import AutoTokenizer

    from unialign.config import InferenceConfig, ModelConfig, Preprocess
    from unialign.model.factory import create_student, export_checkpoint
    from unialign.search.build import build_index, entries_from_folder
    from unialign.standins import make_text_model

    vit = {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4}
    text_dir = make_text_model(root / "text", QUERIES)
    spec = InferenceConfig(model=ModelConfig.model_validate({
        "image": {"name": "vit_small_patch16_224", "pretrained": False, "layers": 2, "kwargs": vit},
        "text": {"name": str(text_dir), "layers": 2, "max_length": 32},
        "shared": {"depth": 1, "num_heads": 4}}), preprocess=Preprocess(image_size=64))
    torch.manual_seed(0)
    ckpt = export_checkpoint(create_student(spec), spec, AutoTokenizer.from_pretrained(text_dir), root / "tiny.ckpt")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(n_images):
        image = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))
        x0, y0 = (int(v) for v in rng.integers(0, 32, 2))
        ImageDraw.Draw(image).ellipse((x0, y0, x0 + 28, y0 + 28), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(root / "images" / f"{i:05d}.png")
    build_index(ckpt, entries_from_folder(root / "images"), root / "index", device="cpu", progress=False)
    return root / "index"


def _run_server(index: str, port: int, checkpoint: str | None) -> None:
    from unialign.search.app import serve

    serve(index, host="127.0.0.1", port=port, checkpoint=checkpoint, device="cpu", log_level="warning")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _served_index(args: argparse.Namespace) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """`unialign serve` over ``args.index`` (or a tiny generated one) in a spawned process: its
    base URL, the process and /api/health once it answers; stopped on the way out."""
    import multiprocessing

    with tempfile.TemporaryDirectory() as tmp:
        index = Path(args.index) if args.index else tiny_index(Path(tmp), args.images)
        port = _free_port()
        server = multiprocessing.get_context("spawn").Process(
            target=_run_server, args=(str(index), port, args.checkpoint), daemon=True)
        server.start()
        base = f"http://127.0.0.1:{port}"
        try:
            yield base, server, _wait_ready(base, server)
        finally:
            server.terminate()
            server.join(10)


def bench_serve(args: argparse.Namespace) -> dict[str, Any]:

    import httpx

    host = machine_info()
    with _served_index(args) as (base, server, health):
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        per_client = [args.requests // args.concurrency + (i < args.requests % args.concurrency)
                      for i in range(args.concurrency)]

        def client(n: int, seed: int) -> None:
            rng = np.random.default_rng(seed)
            with httpx.Client(base_url=base, timeout=30) as http:
                for _ in range(n):
                    params = {"q": QUERIES[rng.integers(len(QUERIES))], "k": args.k}
                    t0 = time.perf_counter()
                    try:
                        r = http.get("/api/search", params=params)
                        ok = r.status_code == 200 and len(r.json()["results"]) == min(args.k, health["items"])
                        problem = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                    except httpx.HTTPError as err:
                        problem = f"{type(err).__name__}: {err}"
                    elapsed = time.perf_counter() - t0
                    with lock:
                        latencies.append(elapsed)
                        if problem:
                            errors.append(problem)

        client(20, seed=-1 % 2**32)  # warm-up, not counted
        latencies.clear()
        errors.clear()
        threads = [threading.Thread(target=client, args=(n, i)) for i, n in enumerate(per_client)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    return {
        "section": "serve-load",
        "machine": host,
        "index": str(args.index or f"synthetic: {args.images} images, tiny untrained model"),
        "index_items": health["items"], "image_index": health["image_index"], "dim": health["dim"],
        "endpoint": "GET /api/search", "k": args.k,
        "requests": len(latencies), "concurrency": args.concurrency,
        "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 1),
        "latency": percentiles(latencies), "errors": len(errors), "error_samples": errors[:5],
    }


def _rss_mib(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "VmHWM")}


def big_png(width: int, height: int) -> bytes:
    """A PNG of width x height pixels that compresses to a few tens of KB (flat colour, one shape),
    like the upload in the memory report: small on the wire, large once decoded."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (30, 90, 200))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=(220, 30, 30))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def bench_upload_rss(args: argparse.Namespace) -> dict[str, Any]:
    """RSS of `unialign serve` (its own process, default limits) while bursts of concurrent
    POST /api/search/image of one large PNG arrive: peak (VmHWM) and resident after each burst,
    both minus the RSS of the idle server before the first upload."""
    import httpx

    host = machine_info()
    width, height = args.upload_size
    data = big_png(width, height)
    with _served_index(args) as (base, server, _):
        with httpx.Client(base_url=base, timeout=30) as http:  # warm-up: model and upload path loaded
            http.post("/api/search/image", files={"file": ("small.png", big_png(64, 64), "image/png")})
        idle = _rss_mib(server.pid)
        bursts = []
        for _ in range(args.bursts):
            statuses: list[int] = []
            barrier = threading.Barrier(args.concurrency)

            def client(i: int) -> None:
                barrier.wait()
                with httpx.Client(base_url=base, timeout=300) as http:
                    r = http.post("/api/search/image", files={"file": (f"big{i}.png", data, "image/png")})
                statuses.append(r.status_code)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.concurrency)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rss = _rss_mib(server.pid)
            bursts.append({"wall_s": round(time.perf_counter() - t0, 1), "ok": statuses.count(200),
                           "statuses": sorted(set(statuses)), "rss_mib": rss["VmRSS"],
                           "rss_after_minus_idle_mib": round(rss["VmRSS"] - idle["VmRSS"], 1)})
        peak = _rss_mib(server.pid)["VmHWM"]
    return {
        "section": "upload-rss", "machine": host,
        "upload": {"width": width, "height": height, "bytes": len(data), "format": "PNG",
                   "full_decode_mib": round(width * height * 3 / 2**20, 1)},
        "concurrency": args.concurrency, "bursts": bursts, "idle_rss_mib": idle["VmRSS"],
        "peak_rss_mib": peak, "peak_minus_idle_mib": round(peak - idle["VmRSS"], 1),
    }


def print_upload_rss(r: dict[str, Any]) -> None:
    m, u = r["machine"], r["upload"]
    print(f"device: {m['cpu']}, {m['cores']} cores (load average {m['loadavg_1m']} at start)")
    print(f"upload: {u['width']}x{u['height']} PNG, {u['bytes']:,} bytes ({u['full_decode_mib']} MiB as RGB); "
          f"{r['concurrency']} concurrent uploads per burst; server idle RSS {r['idle_rss_mib']} MiB")
    for i, b in enumerate(r["bursts"], 1):
        print(f"burst {i}: {b['ok']}/{r['concurrency']} answered 200 (statuses {b['statuses']}) in {b['wall_s']} s; "
              f"RSS after: {b['rss_mib']} MiB (+{b['rss_after_minus_idle_mib']} MiB over idle)")
    print(f"peak RSS (VmHWM): {r['peak_rss_mib']} MiB (+{r['peak_minus_idle_mib']} MiB over idle)")


def _wait_ready(base: str, server: Any, timeout: float = 120) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.is_alive():
            raise SystemExit(f"server exited with code {server.exitcode} before it was ready")
        try:
            return httpx.get(f"{base}/api/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"server at {base} not ready after {timeout:.0f}s")


def print_serve(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"device: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'} (load average {m['loadavg_1m']} "
          f"at start)")
    print(f"index: {r['index']} ({r['index_items']} items, {r['image_index']}, dim {r['dim']})")
    print(f"{r['requests']} x {r['endpoint']} k={r['k']} from {r['concurrency']} concurrent clients over loopback "
          f"in {r['wall_s']} s: {r['requests_per_s']} requests/s")
    lat = r["latency"]
    print(f"latency: p50={lat['p50_ms']:.1f} ms p99={lat['p99_ms']:.1f} ms max={lat['max_ms']:.1f} ms; "
          f"errors: {r['errors']}" + (f" e.g. {r['error_samples'][0]}" if r["errors"] else ""))


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
