"""bench/search.py's service half: `unialign serve` in its own process over an index (or a tiny
generated one), loaded with concurrent text queries (--serve-load) or bursts of large image uploads
while its RSS is read (--upload-rss); and the latency percentiles both halves report. Imported with
bench/ on the path (as a script run from it has)."""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from unialign.machine import machine_info


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max())}


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
