"""`unialign demo`'s run: train the table's models (or reuse finished runs), evaluate, search, report.

One progress bar covers the whole run; the libraries' own bars and banners are kept quiet.
What is trained comes from `.plan`, the report's tables and plots from `unialign.report`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from tqdm import tqdm

from ..assets import check_assets
from ..config import Config
from ..examples import draw_search_examples, search_examples
from ..files import write_json_atomic
from ..machine import machine_info
from ..report import (
    RECALL_KEYS,
    chance_recalls,
    demo_extra_tables,
    demo_table,
    describe_machine,
    query_bank_note,
    write_demo_report,
)
from .plan import (
    USED_ASSETS,
    choose_scale,
    default_cache_dir,
    demo_config,
    prepare_assets,
    steps_per_run,
    table_rows,
    with_teacher_cache,
)


class StepProgress(L.Callback):
    """Advances the demo's single progress bar by one per training step and shows the loss."""

    def __init__(self, bar: tqdm, name: str) -> None:
        self.bar = bar
        self.name = name

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.bar.update(1)
        if loss is not None:
            self.bar.set_postfix_str(f"{self.name} loss {float(loss):.3f}", refresh=False)


def _holds_run_of(cfg: Config, run_dir: Path) -> bool:
    """Whether `run_dir` holds a run (finished or not) of this config; one of another config is refused
    rather than overwritten."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        return False
    if yaml.safe_load(config_file.read_text()) != cfg.model_dump(mode="json"):
        raise FileExistsError(f"{run_dir} holds a run with another config; choose another --output")
    return True


def train_or_reuse(cfg: Config, run_dir: Path, callbacks: list[L.Callback]) -> tuple[dict[str, Any], bool]:
    """Train, or reuse a finished run of the identical config (re-running the demo is free).

    Returns (summary, reused). A folder holding a run with another config is refused
    rather than overwritten; an unfinished one is trained again (runs are minutes long and
    write no intermediate checkpoints; one stopped while saving resumes from its
    last.ckpt). After a finished run only the weights-only
    final.ckpt is kept: the full-state last.ckpt (optimizer included) is three times its size.
    """
    from ..training.trainer import CHECKPOINT_DIR, FINAL, LAST, resume_checkpoint, run_files, train

    if _holds_run_of(cfg, run_dir):
        summary_file = run_dir / "summary.json"
        if summary_file.is_file() and (run_dir / CHECKPOINT_DIR / FINAL).is_file():
            return json.loads(summary_file.read_text()), True
    try:
        resume = resume_checkpoint(run_dir).is_file()
    except FileNotFoundError:
        resume = False
        for name in run_files(run_dir):  # what an unfinished run of this config left: it is trained again
            (run_dir / name).unlink()
    summary = train(cfg, run_dir, resume=resume, callbacks=callbacks)
    (run_dir / CHECKPOINT_DIR / LAST).unlink(missing_ok=True)
    return summary, False


def train_hf_or_reuse(cfg: Config, run_dir: Path, callbacks: list[L.Callback]) -> tuple[dict[str, Any], bool]:
    """`train_or_reuse` for the Hugging Face dual-encoder row: its model is a transformers folder
    (no unialign checkpoint, no resume), so an unfinished run starts again from scratch."""
    import shutil

    from ..training.hf_dual import HF_FOLDER, train_hf_dual_encoder

    summary_file = run_dir / "summary.json"
    if _holds_run_of(cfg, run_dir):
        if summary_file.is_file() and (run_dir / HF_FOLDER).is_dir():
            return json.loads(summary_file.read_text()), True
        shutil.rmtree(run_dir)
    summary = train_hf_dual_encoder(cfg, run_dir, callbacks)
    write_json_atomic(summary_file, summary)
    return summary, False


def model_spec(run_dir: Path, hf_dual: bool) -> str:
    """What `load_eval_model` evaluates for a finished run: the Hugging Face baseline's transformers
    folder or the final checkpoint."""
    from ..training.hf_dual import HF_FOLDER
    from ..training.trainer import CHECKPOINT_DIR, FINAL

    return f"hf:{run_dir / HF_FOLDER}" if hf_dual else str(run_dir / CHECKPOINT_DIR / FINAL)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep the terminal to one progress bar: no per-load bars or Lightning banners.

    transformers shows a bar for every weight load; Lightning announces devices and warns about
    few loader workers (deliberate on 2 cores) and the teacher-cache hook.
    """
    from transformers.utils import logging as hf_logging

    quiet = ("lightning", "lightning.pytorch", "lightning.fabric", "unialign.data", "unialign.training",
             "matplotlib")
    levels = {name: logging.getLogger(name).level for name in quiet}
    hf_bars = hf_logging.is_progress_bar_enabled()
    for name in levels:
        logging.getLogger(name).setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")  # smoke runs
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if hf_bars:
            hf_logging.enable_progress_bar()


def run_demo(output: Path, quick: bool = False, cache: Path | None = None) -> dict[str, Any]:
    """Prepare assets, train the three models, evaluate, search, write the report; returns it."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..config import parse_config
    from ..data.records import read_karpathy_eval
    from ..evaluation.encode import PixelMemo
    from ..evaluation.models import load_eval_model
    from ..evaluation.run import evaluate_retrieval_model
    from ..training.prefix_cache import shared_prefix_caches
    from ..training.trainer import CHECKPOINT_DIR, FINAL

    start, cpu_start = time.perf_counter(), time.process_time()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else default_cache_dir()
    status = check_assets()
    for name in USED_ASSETS:
        if status.get(name) is not None:
            print(f"real asset {name!r} is missing; using a stand-in. Install it with: {status[name]}")
    times: dict[str, float] = {}
    # shared_prefix_caches: the rows on the same pretrained towers compute their frozen blocks once between them.
    with quiet_libraries(), logging_redirect_tqdm(), shared_prefix_caches(), \
            tqdm(total=0, desc="preparing assets", unit="step", dynamic_ncols=True) as bar:
        t0 = time.perf_counter()
        scale = choose_scale(quick, status)
        assets = prepare_assets(cache, output, scale, status)
        rows = table_rows(assets)
        bar.set_description("teacher targets")
        configs = {}
        for row in rows:
            raw = demo_config(assets, scale, row)
            configs[row.key] = parse_config(with_teacher_cache(raw, cache) if row.kd else raw,
                                            source=f"demo:{row.key}")
        n_steps = steps_per_run(configs[rows[0].key])
        bar.total = len(rows) * (n_steps + 1)  # + one unit per evaluation
        bar.refresh()
        times["assets"] = time.perf_counter() - t0
        results: dict[str, dict[str, Any]] = {}
        extra_results: dict[str, dict[str, dict[str, Any]]] = {}
        reused_runs: list[str] = []
        training: dict[str, dict[str, Any]] = {}
        memo = PixelMemo()  # every row but the Hugging Face one preprocesses alike: each file is decoded once
        for row in rows:
            run_dir = output / "runs" / row.key
            bar.set_description(f"training {row.key}")
            t0 = time.perf_counter()
            summary, reused = (train_hf_or_reuse if row.hf_dual else train_or_reuse)(
                configs[row.key], run_dir, [StepProgress(bar, row.key)])
            training[row.key] = {"steps": summary["global_step"], "samples": summary["samples_seen"],
                                 "final_loss": summary["metrics"].get("train/loss")}
            if reused:
                reused_runs.append(row.key)
                bar.update(n_steps)
            times[f"train_{row.key}"] = time.perf_counter() - t0
            bar.set_description(f"evaluating {row.key}")
            t0 = time.perf_counter()
            result_file = run_dir / "retrieval_test.json"
            model = None
            result = json.loads(result_file.read_text()) if reused and result_file.is_file() else {}
            if "query_bank" not in result:  # a reused run has the same config, so the same evaluation set
                model = load_eval_model(model_spec(run_dir, row.hf_dual))
                result = evaluate_retrieval_model(model, assets.eval_json, images=assets.eval_images, split="test",
                                                  progress=False, memo=memo, query_bank=",".join(assets.bank_splits))
                write_json_atomic(result_file, result)
            results[row.key] = result
            for i, (name, karpathy, images) in enumerate(assets.extra_evals):
                extra_file = run_dir / f"retrieval_extra{i}.json"
                if reused and extra_file.is_file():
                    extra = json.loads(extra_file.read_text())
                else:
                    model = model or load_eval_model(model_spec(run_dir, row.hf_dual))
                    extra = evaluate_retrieval_model(model, karpathy, images=images, split="test", progress=False,
                                                     memo=memo)
                    write_json_atomic(extra_file, extra)
                extra_results.setdefault(name, {})[row.key] = _metrics(extra)
            times[f"eval_{row.key}"] = time.perf_counter() - t0
            bar.update(1)
        bar.set_description("search examples")
        t0 = time.perf_counter()
        search = search_examples(output / "runs" / rows[0].key / CHECKPOINT_DIR / FINAL, assets.eval_json,
                                 assets.eval_images, memo=memo, bank_splits=assets.bank_splits)
        examples_png = draw_search_examples(search["queries"], assets.eval_images, output / "search_examples.png")
        times["search"] = time.perf_counter() - t0
        bar.set_description("done")
    times["total"] = time.perf_counter() - start
    # CPU seconds of all this process's threads: on a shared machine the wall time says more
    # about the neighbours than about the demo.
    times["cpu_total"] = time.process_time() - cpu_start
    first = results[rows[0].key]
    eval_set = read_karpathy_eval(assets.eval_json, assets.eval_images, "test")
    per_image = [0] * len(eval_set.images)
    for i in eval_set.caption_to_image:
        per_image[i] += 1
    report: dict[str, Any] = {
        "quick": quick,
        "machine": machine_info(),
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "used": assets.used,
        "missing": assets.missing,
        "scale": asdict(scale),
        "precision": configs[rows[0].key].train.precision,
        "steps_per_run": n_steps,
        "eval": {"name": assets.eval_name, "images": first["n_images"], "captions": first["n_captions"]},
        "chance": chance_recalls(per_image),
        "rows": [asdict(row) for row in rows],
        "results": {k: _metrics(v) for k, v in results.items()},
        "results_extra": extra_results,
        "training": training,
        "reused_runs": reused_runs,
        "search": search["queries"],
        # every test caption searched: how many find their image in the top 3 (the examples are 4 of them)
        "search_all": {k: search[k] for k in ("top_k", "captions", "found", "found_plain", "query_bank")},
        "search_examples_png": examples_png.name,
    }
    files = write_demo_report(output, report)
    _print_summary(report, files)
    return report


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    metrics = {m: result[m] for m in (*RECALL_KEYS, "rsum", "n_images", "n_captions")}
    if "query_bank" in result:
        bank = result["query_bank"]
        metrics["query_bank"] = {m: bank[m] for m in (*RECALL_KEYS, "beta", "bank_images", "bank_captions")}
    return metrics


def _print_summary(report: dict[str, Any], files: dict[str, Path]) -> None:
    e = report["eval"]
    print(f"\nRetrieval on {e['name']} ({e['images']} images, {e['captions']} captions, never trained on), "
          "recall@K in percent (TR = image -> text, IR = text -> image):\n")
    print(demo_table(report))
    print(query_bank_note(report) + "\n")
    for line in demo_extra_tables(report):
        print(line)
    print(f"\nText-to-image search with the pretrained + KD model (top 3; query bank: the "
          f"{report['search_all']['query_bank']} training captions):")
    for ex in report["search"]:
        top = ", ".join(t["file"] + (" *" if t["correct"] else "") for t in ex["top"])
        print(f"  {ex['query']!r:45} -> {top}")
    every = report["search_all"]
    print(f"  (* = the captioned image; over all {every['captions']} test captions, {every['found']} find their "
          f"image in the top {every['top_k']}, {every['found_plain']} by the cosine alone)")
    t = report["wall_time_s"]
    print(f"\nwall time {t['total']:.0f} s (CPU time {t['cpu_total']:.0f} s) on {describe_machine(report['machine'])}")
    print("report: " + ", ".join(str(p) for p in files.values()))
