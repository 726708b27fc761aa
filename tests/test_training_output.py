"""What a training run prints: progress lines without the bar, no noise; and the lr schedule's length."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from test_training import _config, world  # noqa: F401  (world: a fixture)
from unialign.config import parse_config
from unialign.training import progress
from unialign.training.progress import ProgressLog
from unialign.training.trainer import train

PROGRESS_LINE = re.compile(r"step (\d+)/(\d+), epoch 1/\d, loss \d+\.\d+, \d+\.\d pairs/s, ETA \d+:\d\d:\d\d")


def test_progress_lines_without_the_bar(world, text_model_dir, teacher_checkpoint, tmp_path, caplog):  # noqa: F811
    cfg = parse_config(_config(world, text_model_dir, teacher_checkpoint, max_steps=6, log_every_steps=2))
    assert not cfg.train.progress_bar
    with caplog.at_level(logging.INFO, logger="unialign.training.progress"):
        train(cfg, tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.name == "unialign.training.progress"]
    assert all(PROGRESS_LINE.fullmatch(line) for line in lines), lines
    steps = [int(PROGRESS_LINE.fullmatch(line)[1]) for line in lines]
    # The first logging step at once, then at most one line per 30 s (a few seconds here), and the last step.
    assert steps[0] == 2 and steps[-1] == 6 and set(steps) <= {2, 4, 6}, steps
    assert lines[-1].endswith("ETA 0:00:00")


def _stub_trainer(step: int, rank_zero: bool = True) -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=rank_zero, world_size=2, global_step=step, estimated_stepping_batches=100,
                           callback_metrics={"train/loss": torch.tensor(1.5)}, current_epoch=0, max_epochs=3)


def test_progress_lines_are_rate_limited_and_rank_zero_only(monkeypatch, caplog):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    batch = {"image": torch.zeros(4, 3, 2, 2)}
    callback = ProgressLog(every_steps=5, interval_s=30)
    callback.on_train_start(_stub_trainer(0), None)
    with caplog.at_level(logging.INFO, logger="unialign.training.progress"):
        for step in range(1, 101):
            clock[0] = step * 2.0  # 2 s a step, 4 pairs a rank
            callback.on_train_batch_end(_stub_trainer(step), None, None, batch, step - 1)
            callback.on_train_batch_end(_stub_trainer(step, rank_zero=False), None, None, batch, step - 1)
    lines = [r.getMessage() for r in caplog.records]
    # step 5 at once, then the first logging step 30 s after each line, then the last step
    assert [int(PROGRESS_LINE.fullmatch(line)[1]) for line in lines] == [5, 20, 35, 50, 65, 80, 95, 100], lines
    assert lines[1] == "step 20/100, epoch 1/3, loss 1.5000, 4.0 pairs/s, ETA 0:02:40"


class LrRecorder(Callback):
    def __init__(self) -> None:
        self.factors: dict[int, float] = {}  # global step -> lr / peak lr, as the step ran
        self.after = 1.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        group = trainer.optimizers[0].param_groups[0]
        self.factors[trainer.global_step] = group["lr"] / group["initial_lr"]

    def on_train_end(self, trainer, pl_module) -> None:
        self.after = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]


def test_schedule_ends_at_max_steps(world, text_model_dir, teacher_checkpoint, tmp_path):  # noqa: F811
    # 16 batches an epoch, 2 a step: the configured epoch holds 8 optimizer steps, max_steps stops at 4.
    cfg = parse_config(_config(world, text_model_dir, teacher_checkpoint, max_steps=4, batch_size=16,
                               accumulate_grad_batches=2, warmup_fraction=0.5))
    recorder = LrRecorder()
    summary = train(cfg, tmp_path / "run", callbacks=[recorder])
    assert summary["global_step"] == 4
    # 2 warm-up steps (half of 4), then a cosine that reaches 0 after the 4th step
    assert recorder.factors == pytest.approx({0: 0.0, 1: 0.5, 2: 1.0, 3: 0.5})
    assert recorder.after == pytest.approx(0.0, abs=1e-12)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_text_tower_load_report_only_for_missing_weights(text_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from unialign.model.towers import TextTower

    damaged = shutil.copytree(text_model_dir, tmp_path / "damaged")
    weights = load_file(damaged / "model.safetensors")
    del weights["encoder.layer.0.attention.self.query.weight"]
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    records = _Records()
    report = logging.getLogger("transformers.modeling_utils")
    report.addHandler(records)
    try:
        TextTower(str(text_model_dir), pretrained=True, layers=2)  # the pooler is unused: no report
        assert records.messages == []
        TextTower(str(damaged), pretrained=True, layers=2)
    finally:
        report.removeHandler(records)
    (message,) = records.messages
    assert "LOAD REPORT" in message and "MISSING" in message and "query.weight" in message
    assert "pooler.dense.weight" in message  # the whole report, as transformers wrote it


def _normalised(line: str) -> str:
    """A log line without its timestamp, level and logger name (Lightning's own handler printed
    them without the timestamp and name)."""
    return re.sub(r"^(\d{4}-\d\d-\d\d [\d:,]+ )?[A-Z]+( [\w.]+)?: ", "", line)


def test_cli_train_prints_no_noise(world, text_model_dir, teacher_checkpoint, tmp_path):  # noqa: F811
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(world, text_model_dir, teacher_checkpoint, max_steps=2)))
    done = subprocess.run([sys.executable, "-m", "unialign.cli", "train", "--config", str(config), "--output",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    lines = [_normalised(line) for line in out.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), out
    assert "GPU available" in out  # Lightning's records are printed, once
    for noise in ("UNEXPECTED", "LOAD REPORT", "litmodels", "litlogger", "Tip:", "Total length", "Loading weights",
                  "weights_only", "LeafSpec"):
        assert noise not in out, (noise, out)
    assert re.search(r"INFO unialign\.training\.progress: step 2/2, .* pairs/s, ETA 0:00:00", out), out


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_logging_keeps_faiss_loader_quiet(verbose):
    code = f"from unialign.cli import setup_logging; setup_logging({verbose}); import faiss"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("faiss.loader" in done.stderr) == verbose, done.stderr  # shown with -v only


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_logging_keeps_matplotlibs_font_cache_quiet(verbose, tmp_path):
    """A first plot builds matplotlib's font cache, which reports at INFO (and each installed font it cannot
    use, such as Noto Color Emoji); an empty MPLCONFIGDIR makes this run the first."""
    code = (f"from unialign.cli import setup_logging; setup_logging({verbose}); "
            "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; plt.figure()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert done.returncode == 0, done.stderr
    assert ("matplotlib.font_manager" in done.stderr) == verbose, done.stderr  # shown with -v only
