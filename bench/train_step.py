"""Training-step benchmark: S-SMKE at the paper's shapes, side by side with its baselines.

    python bench/train_step.py                          # GPU: batch 256, every variant (~5 min on an H100)
    python bench/train_step.py --compile --json out.json
    python bench/train_step.py --small --json out.json  # CPU smoke at tiny shapes (CI import check)

Every model has random weights of the real shapes, built offline (no download):

- ``unialign-bf16-online``   first 6 blocks of timm ``vit_base_patch16_224`` + first 6 layers of
  BERT-base (from a BertConfig) + 1 shared block; ITC on x and x_interm + contrastive KD with a
  full 65,536-target bank; frozen ``beitv2_base_patch16_224`` teacher run every step; bf16
  autocast, SDPA everywhere, fused AdamW on CUDA. The step is the library's own (``DistillTask``,
  whose forward returns the losses), driven by a plain loop (what Lightning's automatic optimisation does).
- ``unialign-bf16-cached``   the same with the teacher replaced by ``teacher.cache`` lookups
  (host-side lookup in a synthetic cache, pinned copy to the device), teacher not built.
- ``author-fp16-eager`` (the baseline "as the author ran it"): same model, fp16 autocast with a
  GradScaler, eager (non-SDPA) attention everywhere, teacher online, unfused AdamW.
- ``clip-vit-b16-bert-base`` (the CLIP baseline of the goal): full ViT-B/16 (12 blocks) + full
  BERT-base (12 layers) dual encoder, linear projections to 512, CLIP loss; bf16, SDPA, fused AdamW.
- ``openclip-vit-b16`` (when open_clip is installed): open_clip's ``ViT-B-16`` (its own 12-layer,
  512-wide text transformer, 77 tokens), bf16, fused AdamW. For reference.
- ``--compile`` adds a ``-compiled`` twin of each selected unialign variant (``train.compile``:
  towers, shared block and teacher through torch.compile; its first step, the compile, is
  reported as ``first_step_s``).

Reported per variant: pairs/s, step time, a per-phase breakdown (data = host->device copy of a
pinned batch [+ cache lookup] [+ normalising uint8 pixels on the device: unialign variants only,
as ``data.normalize_on_device`` does in training]; teacher forward; student forward incl. losses; backward;
optimizer), measured with CUDA events in the timed loop (no extra syncs; on CPU, wall clock);
peak GPU memory; FLOPs per step counted with torch.utils.flop_counter on one real step and
computed analytically; achieved TFLOP/s and MFU against the H100 SXM dense bf16 peak (989
TFLOP/s; ``--peak-tflops`` for another device). Also: teacher-only throughput (what the
``teacher-cache`` pass costs per image), and the SPEC's full run (7 epochs x 3,264,868 pairs)
projected from the measured pairs/s.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unialign.data.transforms import PixelNormalizer
from unialign.files import write_json_atomic
from unialign.machine import machine_info

from step_models import (TINY_BERT, DualEncoder, OpenCLIP, analytic_flops, build_unialign, count_flops, fill_bank,
                         make_batch, make_optimizer, synthetic_cache, unialign_config)

H100_BF16_DENSE_TFLOPS = 989.0
SPEC_EPOCHS = 7
SPEC_PAIRS = 3_264_868  # COCO train+restval 566,747 + CC3M 1,516,133 + CC12M 1,181,988
SPEC_IMAGES = 113_287 + 1_516_133 + 1_181_988  # unique images: what the teacher cache holds


# ---------------------------------------------------------------------------------------
# Timing


class Marks:
    """Timestamps of phases inside a step: CUDA events (no sync) or wall clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps: list[dict[str, Any]] = []
        self.active = False

    def new_step(self) -> None:
        self.steps.append({})

    def mark(self, name: str) -> None:
        if not self.active:
            return
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.steps[-1][name] = ev
        else:
            self.steps[-1][name] = time.perf_counter()

    def elapsed_ms(self, a: str, b: str) -> list[float]:
        out = []
        for s in self.steps:
            if a in s and b in s:
                out.append(s[a].elapsed_time(s[b]) if self.cuda else (s[b] - s[a]) * 1000)
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------
# One variant


def profile_steps(step: Any, device: torch.device, path: Path, steps: int = 3) -> list[dict[str, Any]]:
    """torch.profiler over a few steps: the operator table (by device time) to ``path``; the top
    ten operators with their share of the device time for the JSON."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(i)
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    return [{"op": e.key, "ms_per_step": round(getattr(e, key) / 1000 / steps, 3),
             "share": round(getattr(e, key) / total, 4), "calls_per_step": e.count // steps} for e in events[:10]]


def run_variant(name: str, args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    small = args.small
    cuda = device.type == "cuda"
    spec: dict[str, Any] = {"name": name}
    author = name.startswith("author")
    amp_dtype = torch.float16 if author else torch.bfloat16
    spec["precision"] = "16-mixed (GradScaler)" if author else "bf16-mixed"
    spec["attention"] = "eager" if author else "sdpa"
    spec["optimizer"] = "AdamW " + ("foreach" if author else "fused")
    spec["compiled"] = name.endswith("compiled")
    cache = None
    if name.startswith("unialign") or author:
        spec["teacher"] = "cached" if "cached" in name else "online"
        cfg = unialign_config(small, workdir)
        model = build_unialign(cfg, spec["attention"], spec["compiled"])
        if "cached" in name:
            model.teacher = None  # what teacher.cache does: no teacher is built
            from unialign.training.teacher_cache import TeacherCache

            cache = TeacherCache.open(synthetic_cache(workdir, args.cache_rows, model.kd_dim))
        losses = model  # DistillTask.forward: the named losses and their sum
    elif name.startswith("clip"):
        spec["teacher"] = "none"
        model = DualEncoder(small)
        losses = model.losses
    else:
        spec["teacher"] = "none"
        model = OpenCLIP(small)
        losses = model.losses
    model.to(device).train()
    teacher = getattr(model, "teacher", None)
    if teacher is not None:
        teacher.eval()
    fill_bank(model, device)
    opt = make_optimizer(model, fused=not author)  # as SMKETraining: fused wherever torch has it
    scaler = torch.amp.GradScaler(device.type) if author else None
    vocab = TINY_BERT["vocab_size"] if small else 30522
    clip_len = getattr(model, "context_length", 77)
    # unialign's loader ships uint8 pixels, normalised on the device after the copy; the baselines
    # copy float32 pixels, as the author's code and a CLIP trainer do.
    on_device = name.startswith("unialign")
    spec["pixels_copied"] = "uint8" if on_device else "float32"
    normalizer = PixelNormalizer((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    host = [make_batch(args.batch, 32 if small else 224, args.text_len, vocab, clip_len, seed=s, uint8=on_device)
            for s in range(2)]
    cache_ids = None
    if cache is not None:
        rng = np.random.default_rng(1)
        cache_ids = [torch.from_numpy(rng.choice(cache.ids, size=args.batch)) for _ in range(2)]

    marks = Marks(device)
    if teacher is not None:
        teacher.register_forward_pre_hook(lambda *a: marks.mark("teacher0"))
        teacher.register_forward_hook(lambda *a: marks.mark("teacher1"))

    def step(i: int, timed: bool = True) -> None:
        marks.active = timed
        if timed:
            marks.new_step()
            marks.mark("start")
        src = host[i % 2]
        batch = {k: v.to(device, non_blocking=True) for k, v in src.items()}
        batch["image"] = normalizer(batch["image"])  # RetrievalDataModule.on_after_batch_transfer
        if cache is not None:  # what SMKETraining.on_before_batch_transfer does
            target = cache.lookup(cache_ids[i % 2])
            batch["teacher_target"] = (target.pin_memory() if cuda else target).to(device, non_blocking=True)
            batch["image_id"] = cache_ids[i % 2].to(device, non_blocking=True)
        if timed:
            marks.mark("data")
        with torch.autocast(device.type, dtype=amp_dtype):
            out = losses(batch)
        if timed:
            marks.mark("forward")
        if scaler is not None:
            scaler.scale(out["loss"]).backward()
        else:
            out["loss"].backward()
        if timed:
            marks.mark("backward")
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if timed:
            marks.mark("end")

    # Warm-up (compilation, cuDNN/cuBLAS heuristics, allocator), then FLOPs of one real step.
    t_first = time.perf_counter()
    step(0, timed=False)
    sync(device)
    spec["first_step_s"] = round(time.perf_counter() - t_first, 2)
    for i in range(1, args.warmup):
        step(i, timed=False)
    sync(device)
    if not spec["compiled"]:
        try:
            spec["flops_per_step_counted"] = count_flops(lambda: step(0, timed=False))
        except Exception as err:  # noqa: BLE001 - the counter is best-effort
            spec["flops_per_step_counted"] = None
            spec["flop_count_error"] = f"{type(err).__name__}: {err}"[:200]
    spec["flops_per_step_analytic"] = analytic_flops(name, args.batch, args.text_len, small, clip_len)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync(device)
    wall = time.perf_counter() - t0
    step_ms = wall / args.steps * 1000
    spec["step_ms"] = round(step_ms, 2)
    spec["pairs_per_s"] = round(args.batch * args.steps / wall, 2)

    def median(xs: list[float]) -> float | None:
        return round(float(np.median(xs)), 3) if xs else None

    breakdown = {"data": median(marks.elapsed_ms("start", "data"))}
    fwd = marks.elapsed_ms("data", "forward")
    if teacher is not None:
        t = marks.elapsed_ms("teacher0", "teacher1")
        breakdown["teacher"] = median(t)
        breakdown["student_forward_and_losses"] = median([a - b for a, b in zip(fwd, t, strict=True)])
    else:
        breakdown["forward_and_losses"] = median(fwd)
    breakdown["backward"] = median(marks.elapsed_ms("forward", "backward"))
    breakdown["optimizer"] = median(marks.elapsed_ms("backward", "end"))
    breakdown["clock"] = "cuda events (GPU time between phase boundaries)" if cuda else "wall clock (CPU)"
    spec["breakdown_ms"] = breakdown
    spec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    flops = spec.get("flops_per_step_counted") or spec["flops_per_step_analytic"]
    spec["tflops_per_s"] = round(flops / (step_ms / 1000) / 1e12, 3)
    # MFU only means something on the accelerator whose peak is given.
    spec["mfu_vs_peak"] = round(spec["tflops_per_s"] / args.peak_tflops, 4) if cuda else None

    if args.profile:
        spec["profile_top_ops"] = profile_steps(lambda i: step(i, timed=False), device,
                                                Path(f"{args.profile}.{name}.txt"))

    if teacher is not None and not spec["compiled"]:
        spec["teacher_images_per_s"] = teacher_throughput(teacher, normalizer(host[0]["image"]), device, amp_dtype,
                                                          args)
    return spec  # the model, optimizer and batches go with this frame; main() collects them


@torch.no_grad()
def teacher_throughput(teacher: nn.Module, images: torch.Tensor, device: torch.device, dtype: torch.dtype,
                       args: argparse.Namespace) -> float:
    """Teacher forward alone (what `unialign teacher-cache` spends per image, decoding excluded)."""
    x = images.to(device)
    with torch.autocast(device.type, dtype=dtype):
        for _ in range(max(1, args.warmup)):
            teacher(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            teacher(x)
        sync(device)
    return round(len(x) * args.steps / (time.perf_counter() - t0), 2)


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes, batch 4, 3 steps: a CPU smoke run")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default 256; 4 with --small)")
    p.add_argument("--text-len", type=int, default=None,
                   help="padded caption length (default 64 = model.text.max_length; 16 with --small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --small)")
    p.add_argument("--variants", default="unialign-bf16-online,unialign-bf16-cached,author-fp16-eager,"
                                         "clip-vit-b16-bert-base,openclip-vit-b16")
    p.add_argument("--compile", action="store_true",
                   help="add a torch.compile twin (train.compile) of each selected unialign variant")
    p.add_argument("--cache-rows", type=int, default=None, help="rows of the synthetic teacher cache "
                   "(default 2,811,408 = the SPEC's images, 4.3 GB fp16; 1,000 with --small)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="peak for MFU (default: H100 SXM dense bf16, 989)")
    p.add_argument("--device", default=None)
    p.add_argument("--workdir", default=None, help="where configs and the synthetic cache go (default: a temp dir)")
    p.add_argument("--profile", default=None, metavar="PREFIX", help="after the timed steps, profile 3 more "
                   "(torch.profiler): operator table to PREFIX.VARIANT.txt, top ten in the JSON")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    small = args.small
    args.batch = args.batch or (4 if small else 256)
    args.text_len = args.text_len or (16 if small else 64)
    args.steps = args.steps or (3 if small else 20)
    args.warmup = args.warmup or (1 if small else 5)
    args.cache_rows = args.cache_rows or (1000 if small else SPEC_IMAGES)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = [v for v in args.variants.split(",") if v]
    if args.compile:  # a compiled twin of each selected unialign variant
        variants += [f"{v}-compiled" for v in variants if v.startswith("unialign-") and not v.endswith("compiled")]
    try:
        import open_clip  # noqa: F401
    except ImportError:
        variants = [v for v in variants if not v.startswith("openclip")]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    workdir_ctx = contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()
    result: dict[str, Any] = {
        "bench": "train_step", "small": small, "device": machine_info()["gpu"] or f"CPU ({machine_info()['cpu']})",
        "machine": machine_info(), "batch": args.batch, "text_len": args.text_len, "steps": args.steps,
        "warmup": args.warmup, "peak_tflops_reference": args.peak_tflops, "variants": {},
        "baseline": {"author": "author-fp16-eager", "clip": "clip-vit-b16-bert-base"},
    }
    print(f"device: {result['device']} | batch {args.batch} | text length {args.text_len} | "
          f"{args.steps} timed steps after {args.warmup} warm-up | "
          f"{'SMALL (tiny shapes)' if small else 'paper shapes'}")
    with workdir_ctx as wd:
        workdir = Path(wd)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in variants:
            print(f"-- {name} ...", flush=True)
            try:
                spec = run_variant(name, args, device, workdir)
            except Exception as err:  # noqa: BLE001 - one failing variant (e.g. out of memory) must not lose the others
                import traceback

                traceback.print_exc()
                spec = {"name": name, "error": f"{type(err).__name__}: {err}"[:500]}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["variants"][name] = spec
            if args.json:  # written after each variant: a later crash or timeout loses nothing measured
                write_json_atomic(args.json, result)
            if "error" not in spec:
                b = spec["breakdown_ms"]
                print(f"   {spec['precision']}, {spec['attention']} attention, teacher {spec['teacher']}: "
                      f"{spec['pairs_per_s']:.1f} pairs/s, {spec['step_ms']:.1f} ms/step, "
                      f"{spec['tflops_per_s']:.3f} TFLOP/s, "
                      + (f"MFU {100 * spec['mfu_vs_peak']:.1f}% of {args.peak_tflops:g} TFLOP/s, "
                         f"peak mem {spec['peak_memory_gib']} GiB" if spec["mfu_vs_peak"] is not None
                         else "MFU n/a (CPU)"))
                print("   breakdown (ms): " + ", ".join(f"{k} {v}" for k, v in b.items() if k != "clock"))
    summarize(result)
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return result


def summarize(result: dict[str, Any]) -> None:
    v = {k: s for k, s in result["variants"].items() if "error" not in s}
    rate = {k: s["pairs_per_s"] for k, s in v.items()}
    summary: dict[str, Any] = {}
    author, clip = result["baseline"]["author"], result["baseline"]["clip"]
    for name, value in rate.items():
        row = {}
        if author in rate and name != author:
            row["x_author"] = round(value / rate[author], 3)
        if clip in rate and name != clip:
            row["x_clip"] = round(value / rate[clip], 3)
        if row:
            summary[name] = row
    result["speedups"] = summary
    if result["small"] or not result["machine"]["gpu"]:
        result["goals"] = {"note": "not evaluated: the goals are for one H100 at batch 256 with the paper's "
                                   "shapes; a CPU or --small run says nothing about them"}
        print("speed-ups: " + json.dumps(summary))
        print("goals: not evaluated (CPU or --small run)")
        return
    goals: dict[str, Any] = {}
    if "unialign-bf16-online" in v:
        goals["mfu_bf16_online >= 0.45"] = v["unialign-bf16-online"]["mfu_vs_peak"]
    best_cached = max((k for k in rate if "cached" in k), key=lambda k: rate[k], default=None)
    if best_cached and clip in rate:
        goals["pairs_per_s / clip >= 2.5"] = {best_cached: round(rate[best_cached] / rate[clip], 3)}
    if best_cached:
        train_h = SPEC_EPOCHS * SPEC_PAIRS / rate[best_cached] / 3600
        teacher_rate = v.get("unialign-bf16-online", {}).get("teacher_images_per_s")
        cache_h = SPEC_IMAGES / teacher_rate / 3600 if teacher_rate else None
        goals["spec_full_run_hours_cached <= 1"] = {
            "variant": best_cached, "train_hours": round(train_h, 3),
            "cache_precompute_hours (teacher forward only, decode excluded)": round(cache_h, 3) if cache_h else None,
            "total_hours": round(train_h + (cache_h or 0), 3),
            "assumes": f"{SPEC_EPOCHS} epochs x {SPEC_PAIRS:,} pairs, {SPEC_IMAGES:,} unique images, data loading "
                       "keeps up (see bench/data.py)"}
    result["goals"] = goals
    print("speed-ups: " + json.dumps(summary))
    print("goals: " + json.dumps(goals, indent=1))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)