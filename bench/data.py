"""Data-pipeline benchmark: decoded + augmented images/s from webdataset shards of JPEGs.

    python bench/data.py                          # 4,096 JPEGs of 500x375 in 32 shards, workers 0,2,4,...,cores
    python bench/data.py --workers 0,8,16 --json out.json
    python bench/data.py --small --json out.json  # CPU smoke (CI import check)

Measured in one run, on the same shards:

- ``unialign_w{N}``: the training input pipeline itself (``RetrievalDataModule.train_dataloader``
  on a webdataset source: shard reading, seeded shuffle buffer, PIL decode, RandomResizedCrop
  (0.9-1.0, bicubic) + flip, uint8 tensors (``data.normalize_on_device``, the default: the float
  conversion and normalisation run on the GPU after the copy), tokenising, collating; pinned when
  CUDA is present) with N DataLoader workers. ``unialign_w0`` (one process) is the baseline.
- ``unialign_float_w0``: the same pipeline normalising to float32 in the loader
  (``data.normalize_on_device: false``, what unialign did before): what the uint8 path saves.
- ``pil_decode_only``: one process, PIL decode to RGB, nothing else (the floor of the decode cost).
- ``pil_decode_augment``: one process, unialign's decode + augmentation to normalised float only
  (no shard reading, shuffling, tokenising, collating): the pipeline's per-image floor, and what
  the rest costs; ``pil_decode_augment_uint8`` stops at uint8 (normalisation left to the GPU).
- ``pil_draft_decode_augment``: the same with PIL's ``Image.draft`` (JPEG DCT-domain downscaling,
  never below the crop size); NOT what unialign does today, a candidate for large photos.
- ``unialign_devdec_w{N}``: ``data.decode: device``, the training path: N workers read shards and
  JPEG headers only and draw the crops; each batch is decoded on the device
  (``torchvision.io.decode_jpeg``, nvJPEG on CUDA; torchvision's CPU decoder in the main process
  when there is no GPU), cropped, resized, flipped and normalised there.

Throughput is counted after the first batch (worker start-up is reported separately). The
rate a training run needs is printed next to it: the SPEC's run (7 x 3,264,868 pairs) in one
hour needs 6,348 pairs/s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unialign.files import write_json_atomic
from unialign.machine import machine_info

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NEEDED_PAIRS_PER_S = 7 * 3_264_868 / 3600


# ---------------------------------------------------------------------------------------
# Synthetic shards


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """Smooth colour fields + shapes + sensor-like noise: JPEG sizes close to photos of that size."""
    from PIL import Image, ImageDraw

    low = rng.uniform(0, 255, (max(2, height // 48), max(2, width // 48), 3)).astype(np.uint8)
    img = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(10, width / 3), rng.uniform(10, height / 3)
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _write_shard(job: tuple[Path, int, int, int, int, int]) -> list[int]:
    import webdataset as wds

    path, start, stop, width, height, seed = job
    rng = np.random.default_rng(seed)  # one stream per shard: the same bytes whatever the process count
    sizes = []
    with wds.TarWriter(str(path)) as sink:
        for i in range(start, stop):
            jpg = synthetic_jpeg(rng, width, height)
            sizes.append(len(jpg))
            sink.write({"__key__": f"{i:08d}", "jpg": jpg, "txt": f"a photo number {i} of a red thing on a table",
                        "json": {"image_id": i}})
    return sizes


def write_shards(root: Path, n: int, n_shards: int, width: int, height: int) -> tuple[str, float]:
    """Shards of (jpg, txt, json{image_id}), one process per core; returns the brace pattern and
    the mean JPEG size (KB)."""
    from multiprocessing import get_context

    root.mkdir(parents=True, exist_ok=True)
    marker = root / f"done_{n}_{n_shards}_{width}x{height}.json"
    pattern = str(root / f"shard-{{000000..{n_shards - 1:06d}}}.tar")
    if marker.is_file():
        return pattern, json.loads(marker.read_text())["jpeg_kb_mean"]
    per_shard = -(-n // n_shards)
    jobs = [(root / f"shard-{s:06d}.tar", s * per_shard, min(n, (s + 1) * per_shard), width, height, s)
            for s in range(n_shards)]
    with get_context("fork").Pool(min(len(jobs), len(os.sched_getaffinity(0)))) as pool:
        sizes = [size for shard in pool.map(_write_shard, jobs) for size in shard]
    kb = round(float(np.mean(sizes)) / 1024, 1)
    marker.write_text(json.dumps({"jpeg_kb_mean": kb}))
    return pattern, kb


def tokenizer(workdir: Path) -> Any:
    from transformers import BertTokenizerFast

    words = "a photo number of red thing on table".split() + [str(d) for d in range(10)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *(f"##{d}" for d in range(10))]
    path = workdir / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(path), do_lower_case=True)


# ---------------------------------------------------------------------------------------
# Measurements


def unialign_pipeline(urls: str, n: int, workers: int, args: argparse.Namespace, tok: Any,
                      on_device: bool = True) -> dict[str, Any]:
    from unialign.config import DataConfig, WebDatasetSource
    from unialign.training.datamodule import RetrievalDataModule

    cfg = DataConfig(train=[WebDatasetSource(urls=urls, size=n)], image_size=args.image_size, num_workers=workers,
                     shuffle_buffer=args.shuffle_buffer, normalize_on_device=on_device)
    dm = RetrievalDataModule(cfg, tok, 64, args.batch, seed=0)
    start = time.perf_counter()
    loader = dm.train_dataloader()
    it = iter(loader)
    first = next(it)
    t_first = time.perf_counter() - start
    count = 0
    t0 = time.perf_counter()
    for batch in it:
        count += batch["size"]
    elapsed = time.perf_counter() - t0
    assert first["image"].shape[1:] == (3, args.image_size, args.image_size)
    # The clock starts after the first batch, while the workers have already filled their prefetch
    # queues (2 batches each): once those cover much of the data the rate is not the pipeline's.
    # Measured on an H100 host with 4,096 images: 16 workers read 6,277 images/s, 4 read 606.
    ahead = min(1.0, workers * 2 * args.batch / n)
    return {"images_per_s": round(count / elapsed, 1) if count else None, "images_timed": count,
            **({"note": f"NOT a rate: {ahead:.0%} of the images were decoded before the clock started; "
                        f"use --images >= {8 * workers * 2 * args.batch}"} if ahead > 0.25 else {}),
            "startup_and_first_batch_s": round(t_first, 2), "pinned": bool(first["image"].is_pinned()),
            "pixels": str(first["image"].dtype).removeprefix("torch."),
            "image_batch_mb": round(first["image"].nbytes / 2**20, 1)}


def _raw_jpegs(urls: str, limit: int) -> list[bytes]:
    import webdataset as wds

    out: list[bytes] = []
    for url in wds.shardlists.expand_urls(urls):
        for sample in wds.tarfile_samples(iter([{"url": url}])):
            out.append(sample["jpg"])
            if len(out) >= limit:
                return out
    return out


def pil_decode_only(jpegs: list[bytes]) -> dict[str, Any]:
    from unialign.data.images import load_image

    t0 = time.perf_counter()
    for b in jpegs:
        load_image(b)
    return {"images_per_s": round(len(jpegs) / (time.perf_counter() - t0), 1), "images_timed": len(jpegs)}


def pil_decode_augment(jpegs: list[bytes], args: argparse.Namespace, draft: bool,
                       normalize: bool = True) -> dict[str, Any]:
    """unialign's decode + training augmentation on in-memory JPEGs, nothing else (no shard reading,
    shuffling, per-sample RNG, tokenising or collating); ``draft`` decodes at a reduced DCT scale
    (never below the crop size); ``normalize=False`` stops at uint8."""
    from PIL import Image

    from unialign.data.images import load_image
    from unialign.data.transforms import build_image_transform

    transform = build_image_transform(args.image_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), train=True,
                                      normalize=normalize)
    t0 = time.perf_counter()
    for b in jpegs:
        if draft:
            with Image.open(io.BytesIO(b)) as img:
                img.draft("RGB", (args.image_size, args.image_size))
                transform(img.convert("RGB"))
        else:
            transform(load_image(b))
    out = {"images_per_s": round(len(jpegs) / (time.perf_counter() - t0), 1), "images_timed": len(jpegs)}
    if draft:
        out["note"] = ("candidate, not used by unialign: PIL JPEG draft mode (DCT-domain downscale by 1/2, 1/4, "
                       "1/8 while the image stays >= the crop size; no gain below 2x the crop size)")
    return out


def unialign_device_decode(urls: str, n: int, workers: int, args: argparse.Namespace, tok: Any,
                           device: torch.device) -> dict[str, Any]:
    """``data.decode: device`` as training runs it: N workers read shards and JPEG headers, draw the
    crops and collate; the main process moves each batch to ``device`` and calls the data module's
    ``on_after_batch_transfer`` (batched decode there: nvJPEG on CUDA, crop/resize/flip,
    normalise), timed with a device sync at the end."""
    from unialign.config import DataConfig, WebDatasetSource
    from unialign.training.datamodule import RetrievalDataModule

    cfg = DataConfig(train=[WebDatasetSource(urls=urls, size=n)], image_size=args.image_size, num_workers=workers,
                     shuffle_buffer=args.shuffle_buffer, decode="device")
    dm = RetrievalDataModule(cfg, tok, 64, args.batch, seed=0)

    def finish(batch: dict[str, Any]) -> dict[str, Any]:
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return dm.on_after_batch_transfer(moved, 0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    it = iter(dm.train_dataloader())
    first = finish(next(it))
    sync()
    t_first = time.perf_counter() - start
    count = 0
    t0 = time.perf_counter()
    for batch in it:
        count += finish(batch)["size"]
    sync()
    elapsed = time.perf_counter() - t0
    assert first["image"].shape[1:] == (3, args.image_size, args.image_size) and first["image"].device.type == device.type
    return {"images_per_s": round(count / elapsed, 1) if count else None, "images_timed": count,
            "startup_and_first_batch_s": round(t_first, 2), "decode_device": str(device)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="64 small JPEGs, workers 0 and 2: a CPU smoke run")
    p.add_argument("--images", type=int, default=None, help="JPEGs to generate (default 4096; 64 with --small)")
    p.add_argument("--shards", type=int, default=None, help="default 32 (4 with --small)")
    p.add_argument("--jpeg-size", default=None, help="WxH of the JPEGs (default 500x375, COCO-like; 160x120 small)")
    p.add_argument("--image-size", type=int, default=None, help="training crop (default 224; 64 with --small)")
    p.add_argument("--batch", type=int, default=None, help="default 256 (16 with --small)")
    p.add_argument("--workers", default=None, help="comma list (default 0,2,4,8,... up to the core count)")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of this process (default 1, what each DataLoader worker uses: "
                        "per-image tensor ops only lose from more, and w0 then measures one core)")
    p.add_argument("--workdir", default=None, help="where the shards go (default: a temp dir); reused if present")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    small = args.small
    n = args.images or (64 if small else 4096)
    n_shards = args.shards or (4 if small else 32)
    width, height = map(int, (args.jpeg_size or ("160x120" if small else "500x375")).split("x"))
    args.image_size = args.image_size or (64 if small else 224)
    args.batch = args.batch or (16 if small else 256)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads)
    devdec_workers = [0, 2] if small else sorted({0, 2, min(4, cores)})
    if args.workers:
        workers = [int(w) for w in args.workers.split(",")]
    elif small:
        workers = [0, 2]
    else:
        workers, w = [0], 2
        while w <= cores:
            workers.append(w)
            w *= 2
    info = machine_info()
    result: dict[str, Any] = {"bench": "data", "small": small, "device": info["gpu"] or f"CPU ({info['cpu']})",
                              "machine": info, "images": n, "shards": n_shards, "jpeg_size": f"{width}x{height}",
                              "image_size": args.image_size, "batch": args.batch,
                              "precision": "uint8 pixels (unialign_float_w0: float32)",
                              "main_process_threads": args.threads,
                              "baseline": "unialign_w0",
                              "needed_pairs_per_s_for_1h_spec_run": round(NEEDED_PAIRS_PER_S),
                              "results": {}}
    print(f"device: {result['device']} ({cores} cores) | batch {args.batch} | {n} JPEGs {width}x{height} in "
          f"{n_shards} shards -> {args.image_size}px crops | pixels: uint8, float32 for *float*")
    ctx = nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()
    with ctx as wd:
        root = Path(wd)
        t0 = time.perf_counter()
        urls, kb = write_shards(root / "shards", n, n_shards, width, height)
        result["jpeg_kb_mean"] = kb
        print(f"shards ready ({kb} KB per JPEG, {time.perf_counter() - t0:.1f} s)")
        tok = tokenizer(root)
        res = result["results"]

        def measure(name: str, fn: Any, *fargs: Any, **kw: Any) -> None:
            # Each figure is kept (and the JSON rewritten) as soon as it is measured, and a failing
            # path (the CUDA decoder, a worker crash) is recorded with its error: one failure must
            # not lose the figures of the rest of a 10-minute device call.
            try:
                res[name] = fn(*fargs, **kw)
            except Exception as err:  # noqa: BLE001 - recorded and shown in the table
                import traceback

                traceback.print_exc()
                res[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
            r = res[name]
            print(f"  {name:26s} " + (f"{r['images_per_s']:9.1f} images/s" if r.get("images_per_s")
                                      else str(r.get("error") or r.get("skipped", "n/a"))), flush=True)
            if args.json:
                write_json_atomic(args.json, result)

        jpegs = _raw_jpegs(urls, min(n, 512))
        measure("pil_decode_only", pil_decode_only, jpegs)
        measure("pil_decode_augment", pil_decode_augment, jpegs, args, draft=False)
        measure("pil_decode_augment_uint8", pil_decode_augment, jpegs, args, draft=False, normalize=False)
        measure("pil_draft_decode_augment", pil_decode_augment, jpegs, args, draft=True)
        measure("unialign_float_w0", unialign_pipeline, urls, n, 0, args, tok, on_device=False)
        for w in workers:
            measure(f"unialign_w{w}", unialign_pipeline, urls, n, w, args, tok)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for w in devdec_workers:
            measure(f"unialign_devdec_w{w}", unialign_device_decode, urls, n, w, args, tok, device)
    base = res.get("unialign_w0", {}).get("images_per_s")
    for name, r in res.items():
        rate = r.get("images_per_s")
        if rate and base:
            r["x_baseline"] = round(rate / base, 2)
        print(f"  {name:26s} " + (f"{rate:9.1f} images/s" if rate else f"{r.get('skipped', 'n/a')}")
              + (f"  ({r['x_baseline']}x unialign_w0)" if "x_baseline" in r else "")
              + (f"  ERROR {r['error']}" if "error" in r else ""))
    print(f"a 1-hour SPEC run needs {NEEDED_PAIRS_PER_S:,.0f} pairs/s")
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
