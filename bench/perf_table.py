"""Markdown tables for docs/PERFORMANCE.md from the JSON files the benchmarks write.

    python bench/perf_table.py bench_out/*.json > measured.md

Reads every ``--json`` output of bench/train_step.py, data.py, eval.py, train_run.py and
rerank.py it is given (each names its benchmark in ``"bench"``) and prints, per file: the device
and run parameters, one row per variant, and the issue's goals with the measured value beside
each threshold. Nothing is computed here that the benchmark did not measure, except ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _header(r: dict[str, Any], *keys: str) -> str:
    m = r.get("machine", {})
    host = f"{m.get('cores')} cores of {m.get('cpu')}, torch {m.get('torch')}, CUDA {m.get('cuda')}, " \
           f"1-min load {m.get('loadavg_1m')}"
    params = ", ".join(f"{k} {r[k]}" for k in keys if k in r)
    return f"Device: {r.get('device')} ({host}); {params}."


def train_step_table(r: dict[str, Any]) -> str:
    lines = [_header(r, "batch", "text_len", "steps", "warmup"), "",
             "| variant | precision | teacher | pixels copied | pairs/s | ms/step | MFU | peak GiB | "
             "x author | x CLIP | breakdown ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    speedups = r.get("speedups", {})
    for name, v in r.get("variants", {}).items():
        if "error" in v:
            lines.append(f"| {name} | error: {v['error'][:80]} |" + " |" * 9)
            continue
        mfu = v.get("mfu_vs_peak")
        parts = {k: x for k, x in (v.get("breakdown_ms") or {}).items() if k != "clock"}
        breakdown = ", ".join(f"{k} {_num(x, 1)}" for k, x in parts.items())
        s = speedups.get(name, {})
        lines.append(f"| {name} | {v.get('precision')} | {v.get('teacher')} | {v.get('pixels_copied', '-')} | "
                     f"{_num(v.get('pairs_per_s'))} | {_num(v.get('step_ms'))} | "
                     f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {_num(v.get('peak_memory_gib'), 2)} | "
                     f"{_num(s.get('x_author'), 2)} | {_num(s.get('x_clip'), 2)} | {breakdown} |")
    goals = r.get("goals", {})
    if goals:
        lines += ["", "Goals as the benchmark evaluated them:", ""]
        lines += [f"- `{k}`: {json.dumps(g)}" for k, g in goals.items()]
    return "\n".join(lines)


def data_table(r: dict[str, Any]) -> str:
    lines = [_header(r, "images", "jpeg_size", "jpeg_kb_mean", "image_size", "batch"), "",
             f"Needed for the one-hour SPEC run: {_num(r.get('needed_pairs_per_s_for_1h_spec_run'))} pairs/s.", "",
             "| pipeline | images/s | x baseline | notes |", "|---|---|---|---|"]
    for name, v in r.get("results", {}).items():
        note = (f"error: {v['error'][:80]}" if "error" in v else v.get("skipped") or v.get("note")) or ", ".join(
            f"{k} {v[k]}" for k in ("pixels", "decode_device", "startup_and_first_batch_s") if k in v)
        lines.append(f"| {name} | {_num(v.get('images_per_s'))} | {_num(v.get('x_baseline'), 2)} | {note} |")
    return "\n".join(lines)


def eval_table(r: dict[str, Any]) -> str:
    lines = [_header(r, "images", "captions", "batch", "num_workers"), "",
             "| precision | images s | texts s | ranking s | total s | x baseline |", "|---|---|---|---|---|---|"]
    for name, v in r.get("runs", {}).items():
        if "error" in v:
            lines.append(f"| {name} | error: {v['error'][:80]} |" + " |" * 4)
            continue
        lines.append(f"| {name} | {_num(v.get('images_s'), 2)} | {_num(v.get('texts_s'), 2)} | "
                     f"{_num(v.get('ranking_s'), 2)} | {_num(v.get('total_s'), 2)} | {_num(v.get('x_baseline'), 2)} |")
    return "\n".join(lines)


def train_run_table(r: dict[str, Any]) -> str:
    lines = [_header(r, "batch", "steps", "kill_after", "precision", "num_workers"), "",
             f"bench/train_step.py, same shapes (unialign-bf16-online): "
             f"{_num(r.get('bench_train_step_pairs_per_s'))} pairs/s.", "",
             "| strategy | ok | first launch s | resumed from step | resumed launch s | final step | "
             "pairs/s (own log) | final loss |", "|---|---|---|---|---|---|---|---|"]
    for name, v in r.get("runs", {}).items():
        if "error" in v:
            lines.append(f"| {name} | error: {v['error'][:80]} |" + " |" * 6)
            continue
        first, resumed = v.get("first", {}), v.get("resumed", {})
        lines.append(f"| {name} | {v.get('ok')} | {_num(first.get('wall_s'))} | {_num(v.get('resumed_from_step'))} | "
                     f"{_num(resumed.get('wall_s'))} | {_num(v.get('final_step'))} | "
                     f"{_num(v.get('pairs_per_s_logged'))} | {_num(v.get('final_metrics', {}).get('train/loss'), 3)} |")
    return "\n".join(lines)


def rerank_table(r: dict[str, Any]) -> str:
    ev = r.get("evaluation", {})
    lines = [_header(r, "baseline"), "",
             "| evaluation | images | captions | K | dual encoder s | re-rank s | pairs scored | ms a pair |",
             "|---|---|---|---|---|---|---|---|",
             f"| measured | {_num(ev.get('images'))} | {_num(ev.get('captions'))} | {_num(ev.get('k'))} | "
             f"{_num(ev.get('dual_s'), 2)} | {_num(ev.get('rerank_s'), 2)} | {_num(ev.get('pairs_scored'))} | "
             f"{_num(ev.get('ms_per_pair'), 3)} |"]
    coco = ev.get("coco5k_extrapolated")
    if coco:
        lines.append(f"| COCO-5K, extrapolated | 5,000 | 25,000 | {_num(ev.get('k'))} | ~{_num(coco['dual_s'])} | "
                     f"~{_num(coco['rerank_s'])} | {_num(coco['pairs'])} (at most) | |")
    if r.get("training"):
        lines += ["", "| training step | GFLOP a pair | x baseline | trainable params | ITM head params | "
                  "momentum copy params |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {_num(v['flops_per_pair'] / 1e9, 2)} | {_num(v['x_baseline'], 3)} | "
                  f"{_num(v['trainable_params'])} | {_num(v['itm_head_params'])} | {_num(v['momentum_model_params'])} |"
                  for name, v in r["training"].items()]
    return "\n".join(lines)


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "train_step": train_step_table, "data": data_table, "eval": eval_table, "train_run": train_run_table,
    "rerank": rerank_table}


def render(paths: list[Path]) -> str:
    sections = []
    for path in paths:
        result = json.loads(path.read_text())
        kind = result.get("bench")
        if kind not in TABLES:
            raise SystemExit(f"{path}: not a benchmark result (its \"bench\" is {kind!r}; "
                             f"expected one of {sorted(TABLES)})")
        small = " (--small: a smoke run, not a measurement)" if result.get("small") else ""
        sections.append(f"### {path.name}: bench/{kind}.py{small}\n\n{TABLES[kind](result)}\n")
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="JSON files written by the benchmarks' --json")
    text = render(p.parse_args(argv).results)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
