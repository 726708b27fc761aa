"""How the demo's S-SMKE model grows with its training pairs: a learning curve on the held-out test split.

    python bench/data_curve.py                                   # fractions 0.25 0.5 0.75 1, seeds 0 1 2
    python bench/data_curve.py --fractions 0.5 1 --seeds 0
    python bench/data_curve.py --small --fractions 0.5 1         # stand-in towers and data: a smoke run

The demo trains on the held-out set's train + val images (Tux Paint: 627 stamps). Each fraction keeps the
images whose sha256(path) falls in its share, so a smaller fraction's images are a subset of a larger
one's, and trains the demo's S-SMKE row on them with the demo's recipe (the same passes over fewer pairs:
fewer steps). Each model is scored on the test split: mean recall, and how many test captions find their
image in the top 3 (text to image: the rate the demo's search examples are drawn at), by the cosine and with
query-bank normalisation over the run's own training captions, as the demo's search ranks (the four
examples' ranks with the bank are recorded too). The baseline is fraction 1, the demo's own model. A line, top-3 rate = a + b log2(pairs),
is fitted over all runs, and the number of pairs at which it would reach `--target` is printed (default:
the rate at which 3 of 4 examples in the top 3 is an even bet). What that line says beyond the pairs
measured is an extrapolation, and the output says so. docs/RECIPE.md section 14 was measured this way.

Output in OUTPUT: results.jsonl (one line per run; a finished run of the same config is reused), curve.json,
curve.md and curve.png (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from recipe_sweep import REPO, demo_setup, path_part, train_on, write_copy

from unialign.config import parse_config
from unialign.demo.plan import ROWS, demo_config, with_teacher_cache
from unialign.demo.run import quiet_libraries, train_or_reuse
from unialign.evaluation.encode import PixelMemo
from unialign.evaluation.models import load_eval_model
from unialign.evaluation.run import evaluate_retrieval_model
from unialign.examples import search_examples
from unialign.files import write_json_atomic, write_text_atomic
from unialign.machine import machine_info
from unialign.report import markdown_table, plot_learning_curve
from unialign.training.trainer import CHECKPOINT_DIR, FINAL

TOP_K = 3


def write_subset(dataset: Path, images: Path, fraction: float, out: Path) -> tuple[Path, int]:
    """A copy of the Karpathy JSON `dataset` training on the share `fraction` of its train and val images
    (by sha256 of the path, in thousandths), all as "train"; its test split unchanged. Returns the file
    and how many (image, caption) pairs it trains on."""
    data = json.loads(dataset.read_text())
    share, kept = round(fraction * 1000), []
    for image in data["images"]:
        if image["split"] == "test":
            kept.append(image)
        elif image["split"] in ("train", "val") and path_part(image, 1000) < share:
            kept.append({**image, "split": "train"})
    n_train = sum(len(image["sentences"]) for image in kept if image["split"] == "train")
    if n_train == 0:
        raise SystemExit(f"--fractions {fraction}: no train or val image of {dataset} falls in it")
    target = write_copy(data, images, kept, out / f"{dataset.stem}-{fraction:g}.json",
                        f"{fraction:g} of the train and val images of {dataset.name} by sha256 of the path; "
                        "test unchanged")
    return target, n_train


def at_least(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): k or more of n examples in the top K at a per-caption rate p."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def even_odds_rate(k: int = 3, n: int = 4) -> float:
    """The per-caption rate at which k or more of n examples succeed with probability 1/2 (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at_least(k, n, mid) < 0.5 else (lo, mid)
    return (lo + hi) / 2


def fit_log2(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b log2(x) over (x, y) points: (a, b)."""
    xs = [math.log2(x) for x, _ in points]
    ys = [y for _, y in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--target", type=float, default=None,
                   help="top-3 rate in percent to extrapolate to (default: 3 of 4 examples at even odds)")
    p.add_argument("--small", action="store_true", help="stand-in towers and data: a smoke run")
    p.add_argument("--output", type=Path, default=REPO / "runs" / "data_curve")
    p.add_argument("--cache", type=Path, default=None, help="asset cache (default: the demo's)")
    args = p.parse_args(argv)
    if any(not 0 < f <= 1 for f in args.fractions):
        raise SystemExit(f"--fractions wants shares of the training images in (0, 1], got {args.fractions}")
    target = args.target if args.target is not None else round(100 * even_odds_rate(), 1)
    fractions = sorted(set(args.fractions))
    assets, scale, cache = demo_setup(args.small, args.output, args.cache)
    info = machine_info()
    print(f"device: {info['gpu'] or 'CPU (' + info['cpu'] + ')'} | the demo's S-SMKE row, batch {scale.batch_size}, "
          f"{scale.image_size} px, on fractions {fractions} of {assets.eval_name.split(',')[0]}'s train + val "
          f"images, seeds {args.seeds} | baseline: fraction 1 (the demo's model)", flush=True)
    subsets = {f: write_subset(assets.eval_json, assets.eval_images, f, args.output / "subsets") for f in fractions}
    for f, (_, pairs) in subsets.items():
        if pairs < scale.batch_size:
            raise SystemExit(f"--fractions {f:g}: its {pairs} training pairs make no full batch of {scale.batch_size}")
    runs = []
    memo = PixelMemo()  # every run scores the same test images with the same frozen blocks: preprocessed once
    todo = [(f, seed) for f in fractions for seed in args.seeds]
    start = time.perf_counter()
    for done, (fraction, seed) in enumerate(todo):
        raw = demo_config(assets, scale, ROWS[0])
        raw["seed"] = seed
        train_on(raw, assets, subsets[fraction][0])
        cfg = parse_config(with_teacher_cache(raw, cache) if raw["teacher"]["enabled"] else raw, source="data_curve")
        run = args.output / "runs" / f"f{fraction:g}-s{seed}"
        t = time.perf_counter()
        with quiet_libraries():
            summary, reused = train_or_reuse(cfg, run, [])
        train_s = time.perf_counter() - t
        ckpt = run / CHECKPOINT_DIR / FINAL
        scores = evaluate_retrieval_model(load_eval_model(str(ckpt)), assets.eval_json, images=assets.eval_images,
                                          split="test", progress=False, memo=memo)
        # the subset's test split is the full one; its train split, the run's pairs, is the query bank
        search = search_examples(ckpt, subsets[fraction][0], assets.eval_images, top_k=TOP_K, memo=memo,
                                 bank_splits=("train",))
        line = {"fraction": fraction, "seed": seed, "pairs": subsets[fraction][1], "steps": summary["global_step"],
                "r_mean": round(scores["r_mean"], 2), "top3": search["found_plain"], "captions": search["captions"],
                "top3_rate": round(100 * search["found_plain"] / search["captions"], 2),
                "top3_rate_bank": round(100 * search["found"] / search["captions"], 2),
                "example_ranks_bank": [q["correct_rank"] for q in search["queries"]],
                "train_s": None if reused else round(train_s, 1), "device": info["gpu"] or info["cpu"]}
        runs.append(line)
        with open(args.output / "results.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        elapsed = time.perf_counter() - start
        print(f"[{done + 1}/{len(todo)}] {json.dumps(line)} | {elapsed / (done + 1):.0f} s a run, "
              f"ETA {elapsed / (done + 1) * (len(todo) - done - 1):.0f} s", flush=True)
    return report(runs, target, args.output, info)


def report(runs: list[dict[str, Any]], target: float, output: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Means per fraction, the fitted line and where it meets `target`; curve.json / .md / .png."""
    rows = []
    for fraction in sorted({r["fraction"] for r in runs}):
        mine = [r for r in runs if r["fraction"] == fraction]
        sd = (lambda key: statistics.stdev(r[key] for r in mine) if len(mine) > 1 else 0.0)  # noqa: E731
        rate = statistics.mean(r["top3_rate"] for r in mine)
        rows.append({"fraction": fraction, "pairs": mine[0]["pairs"], "steps": mine[0]["steps"], "seeds": len(mine),
                     "r_mean": round(statistics.mean(r["r_mean"] for r in mine), 2),
                     "r_mean_sd": round(sd("r_mean"), 2),
                     "top3_rate": round(rate, 2), "top3_rate_sd": round(sd("top3_rate"), 2),
                     "p_3_of_4": round(at_least(3, 4, rate / 100), 3),
                     "top3_rate_bank": round(statistics.mean(r["top3_rate_bank"] for r in mine), 2),
                     "top3_rate_bank_sd": round(sd("top3_rate_bank"), 2)})
    fit = None
    if len(rows) > 1:
        a, b = fit_log2([(r["pairs"], r["top3_rate"]) for r in runs])
        fit = {"a": round(a, 2), "b_per_doubling": round(b, 2), "target": target,
               "pairs_at_target": round(2 ** ((target - a) / b)) if b > 0 else None}
    result = {"bench": "data_curve", "device": info["gpu"] or f"CPU ({info['cpu']})", "machine": info,
              "baseline": "fraction 1 (the demo's model)", "top_k": TOP_K, "rows": rows, "fit": fit, "runs": runs}
    table = markdown_table(["fraction", "training pairs", "steps", "seeds", "mean recall", "top-3 rate (%)",
                            "P(>= 3 of 4 in the top 3)", "top-3 rate, query bank (%)"],
                           [[f"{r['fraction']:g}", r["pairs"], r["steps"], r["seeds"],
                             f"{r['r_mean']:.1f} ± {r['r_mean_sd']:.1f}",
                             f"{r['top3_rate']:.1f} ± {r['top3_rate_sd']:.1f}", f"{r['p_3_of_4']:.3f}",
                             f"{r['top3_rate_bank']:.1f} ± {r['top3_rate_bank_sd']:.1f}"] for r in rows])
    lines = [f"Device: {result['device']}. The demo's S-SMKE row on fractions of its training pairs; test split. "
             "The top-3 rate ranks by the cosine; the last column with query-bank normalisation over the run's "
             "own training captions (docs/EVALUATION.md).", "", table, ""]
    if fit:
        lines.append(f"Fit over all runs: top-3 rate = {fit['a']} + {fit['b_per_doubling']} log2(pairs); "
                     f"{target}% (the target) at about {fit['pairs_at_target']} pairs, an extrapolation beyond "
                     f"{max(r['pairs'] for r in rows)}." if fit["pairs_at_target"] else
                     "Fit over all runs: the top-3 rate does not grow with the pairs.")
    write_json_atomic(output / "curve.json", result)
    write_text_atomic(output / "curve.md", "\n".join(lines) + "\n")
    plot_learning_curve([(r["pairs"], r["top3_rate"], r["top3_rate_sd"]) for r in rows],
                        [(r["pairs"], r["r_mean"], r["r_mean_sd"]) for r in rows], output / "curve.png",
                        target, (fit["a"], fit["b_per_doubling"]) if fit else None)
    print("\n" + "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
