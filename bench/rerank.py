"""What ALBEF's options cost: ITM re-ranking at evaluation, and the work they add to training.

    python bench/rerank.py                          # COCO-5K sized: 5,000 images, 25,000 captions, K = 128 (GPU)
    python bench/rerank.py --images 32 --k 16       # a slice on CPU; COCO-5K figures extrapolated from it
    python bench/rerank.py --small --json out.json  # tiny model: a smoke run

Evaluation: the dual encoder (encode the images and captions, rank: what `unialign eval
retrieval` does, the baseline) against re-ranking each query's top K both ways with the ITM
head (what `--rerank K` adds; ALBEF re-ranks K = 256 on COCO, 128 on Flickr). Same model (S-SMKE
at the paper's shapes with random weights + the ITM head), same synthetic JPEGs and captions as
bench/eval.py, same code as `unialign eval retrieval --rerank K` (`evaluation.rerank` with
`evaluation.itm_score.ITMPairScorer`). A run on fewer than 5,000 images also states COCO-5K
figures, extrapolated: the dual encoder linear in images (its ranking is negligible), the
re-ranking linear in scored pairs (5,000 K + 25,000 K at most).

Training: parameters and FLOPs per pair of one training step (forward + backward, counted by
torch's flop counter; the online teacher's forward included) for S-SMKE and with each option:
the ITM head (its loss scores each pair against two hard negatives), the momentum model with
feature queues (one more forward of the student's copy, candidates from the queue), momentum
distillation, all of them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval import make_captions, make_images, make_tokenizer, sync  # bench/eval.py
from step_models import count_flops, make_batch, unialign_config

from unialign.files import write_json_atomic
from unialign.machine import machine_info

COCO_IMAGES, COCO_CAPTIONS = 5000, 25000
QUEUE = 65536  # ALBEF's queue size
OPTIONS = {  # training variants: dotted-key overrides of the S-SMKE config
    "S-SMKE": {},
    "+ ITM head": {"model.itm": True},
    f"+ momentum model, queues {QUEUE}": {"loss.queue_size": QUEUE},
    "+ MoD 0.4": {"loss.mod_alpha": 0.4},
    "all three": {"model.itm": True, "loss.queue_size": QUEUE, "loss.mod_alpha": 0.4},
}


def with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    from unialign.config import Config

    from unialign.demo.plan import set_key

    raw = cfg.model_dump(mode="json")
    for dotted, value in overrides.items():
        set_key(raw, dotted, value)
    return Config.model_validate(raw)


def evaluation_cost(cfg: Any, args: argparse.Namespace, workdir: Path, device: torch.device) -> dict[str, Any]:
    """Seconds of the dual encoder and of re-ranking its top K, on `args.images` images."""
    from unialign.evaluation.encode import encode_images, encode_texts
    from unialign.evaluation.itm_score import ITMPairScorer
    from unialign.evaluation.rerank import rerank_ranks
    from unialign.evaluation.retrieval import retrieval_ranks
    from unialign.model.factory import create_student, eval_transform

    n = args.images
    paths = make_images(workdir / "images_640x480", n, 640, 480, 1)
    captions, owner = make_captions(n, 5)
    torch.manual_seed(0)
    model = create_student(with_overrides(cfg, {"model.itm": True}), kd_dim=None).to(device).eval()
    preprocess = eval_transform(cfg)
    tokenizer = make_tokenizer(workdir, cfg.model.text.max_length)
    encode_images(model, preprocess, paths[:4], 4, 0, device, progress=False)  # untimed warm-up

    sync(device)
    t0 = time.perf_counter()
    img, kept, _ = encode_images(model, preprocess, paths, args.batch, args.num_workers, device, progress=False)
    txt = encode_texts(model, tokenizer, captions, batch_size=args.batch * 4, device=device, progress=False)
    dual = retrieval_ranks(img.to(device), txt.to(device), owner.to(device))
    sync(device)
    t1 = time.perf_counter()
    assert len(kept) == n

    scorer = ITMPairScorer(model, preprocess, tokenizer, paths, captions, device=device,
                           num_workers=args.num_workers)
    scored: list[int] = []

    def score(pairs: torch.Tensor) -> torch.Tensor:
        scored.append(pairs.shape[0])
        return scorer(pairs)

    rerank_ranks(img.to(device), txt.to(device), owner.to(device), args.k, score, dual_ranks=dual)
    sync(device)
    t2 = time.perf_counter()
    dual_s, rerank_s, pairs = t1 - t0, t2 - t1, scored[0]
    out = {"images": n, "captions": len(captions), "k": args.k, "dual_s": round(dual_s, 2),
           "rerank_s": round(rerank_s, 2), "pairs_scored": pairs, "ms_per_pair": round(1000 * rerank_s / pairs, 3)}
    if n < COCO_IMAGES:
        coco_pairs = (COCO_IMAGES + COCO_CAPTIONS) * args.k
        out["coco5k_extrapolated"] = {"dual_s": round(dual_s * COCO_IMAGES / n),
                                      "rerank_s": round(rerank_s / pairs * coco_pairs), "pairs": coco_pairs}
    return out


def training_cost(cfg: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Trainable and stored parameters and FLOPs per pair of one step, for each option."""
    from unialign.training.task import DistillTask

    rows: dict[str, Any] = {}
    batch = make_batch(args.train_batch, cfg.data.image_size, 32, 30522 if not args.small else 200, 77, seed=0)
    batch = {k: v.to(device) for k, v in batch.items()}
    for label, overrides in OPTIONS.items():
        torch.manual_seed(0)
        task = DistillTask.from_config(with_overrides(cfg, overrides)).to(device).train()
        task(batch)["loss"].backward()  # untimed: lazy buffers (queues, bank) come to their steady shapes
        task.zero_grad(set_to_none=True)
        flops = count_flops(lambda: task(batch)["loss"].backward())
        trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
        itm = sum(p.numel() for p in task.model.itm_head.parameters()) if task.model.itm_head is not None else 0
        momentum = sum(p.numel() for p in task.momentum_model.parameters()) if task.momentum_model is not None else 0
        rows[label] = {"flops_per_pair": flops // args.train_batch, "trainable_params": trainable,
                       "itm_head_params": itm, "momentum_model_params": momentum}
    base = rows["S-SMKE"]["flops_per_pair"]
    for r in rows.values():
        r["x_baseline"] = round(r["flops_per_pair"] / base, 3)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny model, 16 images: a smoke run")
    p.add_argument("--images", type=int, default=None, help="default 5,000 on a GPU, 32 on CPU, 16 with --small")
    p.add_argument("--k", type=int, default=128, help="candidates re-ranked per query (default 128)")
    p.add_argument("--batch", type=int, default=None, help="images per encoding batch (default 256 GPU, 16 CPU)")
    p.add_argument("--train-batch", type=int, default=8, help="pairs in the FLOP-counted training step")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--skip-training", action="store_true", help="only the evaluation cost")
    p.add_argument("--device", default=None)
    p.add_argument("--workdir", default=None, help="where the JPEGs go (default: a temp dir); reused if present")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    args.images = args.images or (16 if args.small else COCO_IMAGES if gpu else 32)
    args.batch = args.batch or (256 if gpu else 16)
    info = machine_info()
    result: dict[str, Any] = {"bench": "rerank", "small": args.small, "device": info["gpu"] or f"CPU ({info['cpu']})",
                              "machine": info, "baseline": "dual encoder / S-SMKE without options"}
    print(f"device: {result['device']} | {args.images} images, {5 * args.images} captions, re-rank top {args.k} | "
          f"encode batch {args.batch} | training step of {args.train_batch} pairs | baseline: the dual encoder, "
          f"S-SMKE without options")
    ctx = nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()
    with ctx as wd:
        workdir = Path(wd)
        cfg = unialign_config(args.small, workdir)  # KD bank of the paper's 65,536 (512 with --small)
        ev = result["evaluation"] = evaluation_cost(cfg, args, workdir, device)
        print(f"evaluation: dual encoder {ev['dual_s']:.1f} s; re-rank top {ev['k']}: {ev['rerank_s']:.1f} s for "
              f"{ev['pairs_scored']:,} pairs ({ev['ms_per_pair']:.2f} ms a pair)")
        if "coco5k_extrapolated" in ev:
            x = ev["coco5k_extrapolated"]
            print(f"  COCO-5K, extrapolated: dual encoder ~{x['dual_s']:,} s, re-rank ~{x['rerank_s']:,} s "
                  f"({x['pairs']:,} pairs)")
        if args.json:
            write_json_atomic(args.json, result)
        if not args.skip_training:
            rows = result["training"] = training_cost(cfg, args, device)
            for label, r in rows.items():
                print(f"training {label:34s} {r['flops_per_pair'] / 1e9:8.2f} GFLOP/pair ({r['x_baseline']:.2f}x)  "
                      f"trainable {r['trainable_params'] / 1e6:6.1f} M  ITM head {r['itm_head_params'] / 1e6:5.1f} M  "
                      f"momentum copy {r['momentum_model_params'] / 1e6:6.1f} M")
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
