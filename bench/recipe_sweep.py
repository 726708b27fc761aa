"""The demo's S-SMKE row with one change to its config, against the row unchanged, by cross-validation.

    python bench/recipe_sweep.py --name lr4e-3 --set train.base_lr=0.004
    python bench/recipe_sweep.py --name px84 --set data.image_size=84 --seeds 0 1
    python bench/recipe_sweep.py --small --name smoke --set train.weight_decay=0.1 --folds 2

`--set KEY=VALUE` takes the run config's dotted keys (values read as YAML: `all`, `false`, `0.004`).
The demo trains on the held-out set's train and val splits (Tux Paint: 627 stamps), so a change is
decided by K-fold cross-validation over them (`--folds`, default 4): they are cut into K parts by a
hash of each image's path, and each part is scored (`cv`) by a model trained on the other parts, for
the changed row and, as the baseline from the same invocation, the unchanged one (a finished run of
an identical config in --output is reused). Every image is held out once: ~630 scored images against
the 80 of the val split, where one image moved the score by 1.25 points. The test split is scored too
(`--splits test`, each fold's model), recorded and never used for choosing. docs/RECIPE.md section 9
was measured this way (section 8 with this script's earlier val-split scoring). One JSON line per run
is appended to OUTPUT/results.jsonl; the table of means is printed (Markdown).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from unialign.assets import check_assets
from unialign.config import parse_config
from unialign.demo.plan import (FULL_STANDIN, ROWS, USED_ASSETS, DemoAssets, Scale, choose_scale, default_cache_dir,
                                demo_config, prepare_assets, set_key, with_teacher_cache)
from unialign.demo.run import quiet_libraries, train_or_reuse
from unialign.evaluation.models import load_eval_model
from unialign.evaluation.run import evaluate_retrieval_model
from unialign.files import write_json_atomic
from unialign.machine import machine_info
from unialign.training.trainer import CHECKPOINT_DIR, FINAL

REPO = Path(__file__).resolve().parents[1]


def parse_changes(pairs: list[str]) -> dict[str, Any]:
    """`["train.base_lr=0.004", "model.text.freeze_layers=all"]` -> {key: YAML value}."""
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE (a dotted config key), got {pair!r}")
        changes[key] = yaml.safe_load(value)
    return changes


def demo_setup(small: bool, output: Path, cache: Path | None) -> tuple[DemoAssets, Scale, Path]:
    """The demo's assets (real when installed; `small`: stand-in towers and generated data, a smoke run),
    its scale and the asset cache, without the second held-out set."""
    status = dict.fromkeys(USED_ASSETS, "stand-in") if small else check_assets()
    scale = choose_scale(False, status)
    if small:
        scale = replace(FULL_STANDIN, epochs=3, world_images=40)  # 3 steps a fold at --folds 2
    cache = output / "assets" if small else (cache or default_cache_dir())
    return prepare_assets(cache, output, scale, status, clipart=False), scale, cache


def train_on(raw: dict[str, Any], assets: DemoAssets, dataset: Path) -> None:
    """Point the run config's training source of the held-out set at `dataset` (its "train" split), a
    re-split copy of it; the other sources stay."""
    raw["data"]["train"] = [{**s, "path": str(dataset), "splits": ["train"]}
                            if Path(s["path"]) == assets.eval_json else s for s in raw["data"]["train"]]


def path_part(image: dict[str, Any], parts: int) -> int:
    """Which of `parts` parts a Karpathy image entry falls in, by sha256 of its relative path."""
    return int(hashlib.sha256(f"{image['filepath']}/{image['filename']}".encode()).hexdigest(), 16) % parts


def write_copy(data: dict[str, Any], images: Path, kept: list[dict[str, Any]], target: Path, rule: str) -> Path:
    """`data` (a Karpathy JSON) with only the `kept` image entries, its images at `images`, as `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, {**data, "image_root": str(images), "images": kept, "split_rule": rule})
    return target


def write_fold(dataset: Path, images: Path, folds: int, fold: int, out: Path) -> Path:
    """A copy of the Karpathy JSON `dataset` whose train and val images are re-split: part `fold` of
    `folds` (by a hash of the image's path) is "val", the other parts "train"; test is left out."""
    data = json.loads(dataset.read_text())
    kept = [{**image, "split": "val" if path_part(image, folds) == fold else "train"}
            for image in data["images"] if image["split"] in ("train", "val")]
    if not any(image["split"] == "val" for image in kept):
        raise SystemExit(f"--folds {folds}: part {fold} of {dataset} holds no image (too few for {folds} folds)")
    return write_copy(data, images, kept, out / f"{dataset.stem}-fold{fold}of{folds}.json",
                      f"train and val of {dataset.name}, part {fold} of {folds} by sha256 of the path")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the change's name (run folders, results)")
    p.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--splits", nargs="*", default=["test"], choices=["test"],
                   help="splits scored besides cv (the demo trains on val)")
    p.add_argument("--folds", type=int, default=4, help="K >= 2 parts of the held-out set's train + val images")
    p.add_argument("--small", action="store_true", help="stand-in towers and data: a smoke run")
    p.add_argument("--output", type=Path, default=REPO / "runs" / "recipe_sweep")
    p.add_argument("--cache", type=Path, default=None, help="asset cache (default: the demo's)")
    args = p.parse_args(argv)
    changes = parse_changes(args.changes)
    if args.folds < 2:
        raise SystemExit(f"--folds wants K >= 2, got {args.folds}")
    assets, scale, cache = demo_setup(args.small, args.output, args.cache)
    info = machine_info()
    print(f"device: {info['gpu'] or 'CPU (' + info['cpu'] + ')'} | the demo's S-SMKE row, batch {scale.batch_size}, "
          f"{scale.image_size} px | change {args.name!r}: {changes or ''} | baseline: the row unchanged, same seeds "
          f"and folds")
    folds = [write_fold(assets.eval_json, assets.eval_images, args.folds, k, args.output / "folds")
             for k in range(args.folds)]
    scored = ["cv", *args.splits]
    lines = []
    for seed, fold in ((seed, fold) for seed in args.seeds for fold in folds):
        for name, change in (("base", {}), (args.name, changes)):
            raw = demo_config(assets, scale, ROWS[0])
            raw["seed"] = seed
            train_on(raw, assets, fold)  # the held-out set's training source, re-split
            for key, value in change.items():
                try:
                    set_key(raw, key, value)
                except (KeyError, TypeError):
                    raise SystemExit(f"--set {key}: no such section in the run config") from None
            cfg = parse_config(with_teacher_cache(raw, cache) if raw["teacher"]["enabled"] else raw,
                               source=f"recipe_sweep:{name}")
            run = args.output / "runs" / f"{name}-s{seed}-{fold.stem.rsplit('-', 1)[1]}"
            start = time.perf_counter()
            with quiet_libraries():
                summary, reused = train_or_reuse(cfg, run, [])
            seconds = time.perf_counter() - start
            model = load_eval_model(str(run / CHECKPOINT_DIR / FINAL))
            scores = {split: round(evaluate_retrieval_model(model, fold if split == "cv" else assets.eval_json,
                                                            images=assets.eval_images, split="val" if split == "cv"
                                                            else split, progress=False)["r_mean"], 2)
                      for split in scored}
            line = {"name": name, "seed": seed, "fold": fold.stem, "changes": change, **scores,
                    "steps": summary["global_step"], "train_s": None if reused else round(seconds, 1),
                    "final_loss": summary["metrics"].get("train/loss"), "device": info["gpu"] or info["cpu"]}
            print(json.dumps(line), flush=True)
            with open(args.output / "results.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            lines.append(line)
    runs = f"{len(args.seeds)} seed(s) x {args.folds} folds"
    print(f"\n| run | steps | {' | '.join(f'{s} (mean of {runs})' for s in scored)} |")
    print("|---|---|" + "---|" * len(scored))
    for name in ("base", args.name):
        mine = [x for x in lines if x["name"] == name]
        means = " | ".join(f"{statistics.mean(x[s] for x in mine):.1f}" for s in scored)
        print(f"| {name} | {mine[0]['steps']} | {means} |")
    return lines


if __name__ == "__main__":
    main()
