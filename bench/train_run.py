"""The real training path, end to end: `unialign train` as a user runs it, killed once and resumed.

    python bench/train_run.py --workdir /tmp/ua_run --json out.json          # GPU: ddp, then fsdp
    python bench/train_run.py --small --strategies ddp --json out.json       # CPU smoke (tiny shapes)

Per strategy: configs/paper.yaml's architecture with random weights (ViT-B/16 first 6 blocks,
BERT-base first 6 layers from a local config, one shared block, online BEiTv2-base teacher,
65,536-target bank), generated JPEG webdataset shards (bench/data.py's, COCO-sized), batch 256,
bf16 on a GPU, through the `unialign train` command line in a child process. The child is killed
(SIGKILL, a crash: nothing is flushed) once the checkpoint of `--kill-after` steps is on disk, then
`unialign train --resume` runs it to `--steps`. Reported: whether each launch did what it should
(the kill came after the checkpoint, the resumed launch started there and reached `--steps`), the
wall time of each launch, and pairs/s from the run's own CSV log next to bench/train_step.py's
figure for the same shapes (`unialign-bf16-online`) when its JSON is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import tokenizer, write_shards  # noqa: E402  (bench/data.py: the same shards and vocabulary)
from step_models import unialign_config  # noqa: E402  (the paper's shapes with random weights)

from unialign.files import write_json_atomic  # noqa: E402
from unialign.machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_config(args: argparse.Namespace, workdir: Path, urls: str, n: int, strategy: str) -> Path:
    cfg = unialign_config(args.small, workdir).model_dump(mode="json")
    tokenizer(workdir).save_pretrained(cfg["model"]["text"]["name"])  # tokenizer beside the BERT config
    gpu = torch.cuda.is_available()
    cfg["data"].update({"train": [{"type": "webdataset", "urls": urls, "size": n}], "val": None,
                        "num_workers": args.num_workers, "shuffle_buffer": 1000})
    steps_per_epoch = n // args.batch
    cfg["train"].update({
        "epochs": -(-args.steps // steps_per_epoch), "max_steps": args.steps, "batch_size": args.batch,
        "precision": "bf16-mixed" if gpu else "32-true", "accelerator": "gpu" if gpu else "cpu", "devices": 1,
        "strategy": strategy, "checkpoint_every_steps": args.kill_after, "log_every_steps": args.log_every,
        "loggers": ["csv"], "progress_bar": False})
    path = workdir / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def launch(config: Path, output: Path, resume: bool, kill_when: Path | None, log: Path,
           timeout: float, kill_delay: float = 0.0) -> dict[str, Any]:
    """One `unialign train` child; with `kill_when`, SIGKILL its process group once that file exists."""
    cmd = [sys.executable, "-m", "unialign.cli", "train", "--config", str(config), "--output", str(output)]
    cmd += ["--resume"] if resume else []
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        killed = False
        while child.poll() is None:
            if time.perf_counter() - t0 > timeout:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                return {"error": f"timed out after {timeout:.0f} s (log: {log})", "wall_s": round(timeout, 1)}
            if kill_when is not None and kill_when.exists():
                time.sleep(kill_delay)  # a few steps past the checkpoint: the resumed run must redo them
                os.killpg(child.pid, signal.SIGKILL)
                killed = True
                child.wait()
                break
            time.sleep(0.05)
    r: dict[str, Any] = {"returncode": child.returncode, "killed": killed,
                         "wall_s": round(time.perf_counter() - t0, 1)}
    if child.returncode != 0 and not killed:
        r["error"] = f"exit code {child.returncode}; last lines: " + " | ".join(log.read_text().splitlines()[-5:])
    return r


def logged(output: Path) -> list[dict[str, float]]:
    """Rows of the run's CSV logs (each launch writes a version_N folder), in launch order."""
    rows: list[dict[str, float]] = []
    for path in sorted(output.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def run_strategy(args: argparse.Namespace, workdir: Path, urls: str, n: int, strategy: str) -> dict[str, Any]:
    config = write_config(args, workdir, urls, n, strategy)
    output = workdir / f"run_{strategy}"
    log = workdir / f"{strategy}.log"
    first_ckpt = output / "checkpoints" / f"step{args.kill_after:08d}.ckpt"
    r: dict[str, Any] = {"strategy": strategy}
    r["first"] = launch(config, output, False, first_ckpt, log, args.timeout, args.kill_delay)
    if "error" in r["first"]:
        return r
    start = len(log.read_text())
    r["resumed"] = launch(config, output, True, None, log, args.timeout)
    found = re.search(r"resuming data at epoch (\d+) after (\d+) batches", log.read_text()[start:])
    # the data module logs the epoch and the batches consumed in it; the global step follows
    r["resumed_from_step"] = int(found.group(1)) * (n // args.batch) + int(found.group(2)) if found else None
    summary_path = output / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        r["final_step"] = summary.get("global_step", summary.get("steps"))
        r["final_metrics"] = {k: round(v, 4) for k, v in summary.get("metrics", {}).items()}
    rows = logged(output)
    rates = [row["pairs_per_sec"] for row in rows if "pairs_per_sec" in row]
    steps = [int(row["step"]) for row in rows if "step" in row]
    r["logged_steps"] = [min(steps), max(steps)] if steps else None
    # the EMA of the resumed launch's last logged steps: warm, past compile and loader start-up
    r["pairs_per_s_logged"] = round(rates[-1], 1) if rates else None
    r["ok"] = bool(r["first"].get("killed") and r["resumed"].get("returncode") == 0
                   and r["resumed_from_step"] is not None and args.kill_after <= r["resumed_from_step"] < args.steps
                   and r.get("final_step") == args.steps)
    return r


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes, 16 steps: checks the plumbing")
    p.add_argument("--strategies", default=None, help="comma list (default ddp,fsdp on a GPU, ddp on CPU)")
    p.add_argument("--steps", type=int, default=None, help="default 200 (16 with --small)")
    p.add_argument("--kill-after", type=int, default=None, help="checkpoint step after which the child is "
                   "killed (default 100; 4 with --small)")
    p.add_argument("--batch", type=int, default=None, help="default 256 (4 with --small)")
    p.add_argument("--images", type=int, default=None, help="JPEGs in the shards (default 8192; 64 with --small)")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers (default: cores - 2, max 12)")
    p.add_argument("--log-every", type=int, default=None, help="default 10 (1 with --small)")
    p.add_argument("--kill-delay", type=float, default=None, help="seconds between the checkpoint and the "
                   "kill (default 3; 0 with --small)")
    p.add_argument("--timeout", type=float, default=240, help="seconds per launch")
    p.add_argument("--step-json", default=None, help="bench/train_step.py's JSON from the same machine")
    p.add_argument("--workdir", required=True)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    small, gpu = args.small, torch.cuda.is_available()
    args.steps = args.steps or (16 if small else 200)
    args.kill_after = args.kill_after or (4 if small else 100)
    args.batch = args.batch or (4 if small else 256)
    args.log_every = args.log_every or (1 if small else 10)
    args.kill_delay = args.kill_delay if args.kill_delay is not None else (0.0 if small else 3.0)
    n = args.images or (64 if small else 8192)
    cores = len(os.sched_getaffinity(0))
    args.num_workers = args.num_workers if args.num_workers is not None else (0 if small else min(12, cores - 2))
    strategies = (args.strategies or ("ddp,fsdp" if gpu else "ddp")).split(",")
    info = machine_info()
    result: dict[str, Any] = {"bench": "train_run", "small": small, "device": info["gpu"] or f"CPU ({info['cpu']})",
                              "machine": info, "batch": args.batch, "steps": args.steps,
                              "kill_after": args.kill_after, "images": n, "num_workers": args.num_workers,
                              "precision": "bf16-mixed" if gpu else "32-true", "runs": {}}
    print(f"device: {result['device']} | batch {args.batch} | {args.steps} steps, killed after the step-"
          f"{args.kill_after} checkpoint and resumed | strategies {','.join(strategies)} | "
          f"{args.num_workers} loader workers", flush=True)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    urls, _ = write_shards(workdir / "shards", n, 4 if small else 32, *((160, 120) if small else (500, 375)))
    print(f"shards ready in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.step_json and Path(args.step_json).is_file():
        step = json.loads(Path(args.step_json).read_text())["variants"].get("unialign-bf16-online", {})
        result["bench_train_step_pairs_per_s"] = step.get("pairs_per_s")
    for strategy in strategies:
        try:
            r = run_strategy(args, workdir, urls, n, strategy)
        except Exception as err:  # noqa: BLE001 - recorded; the next strategy still runs
            r = {"strategy": strategy, "error": f"{type(err).__name__}: {err}"[:500]}
        result["runs"][strategy] = r
        print(f"  {strategy}: " + json.dumps(r), flush=True)
        if args.json:
            write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(0 if all(r.get("ok") for r in res["runs"].values()) else 1)
