"""Progress as log lines, for runs without the progress bar (``train.progress_bar: false``)."""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class ProgressLog(Callback):
    """On global rank 0, a line with step/total, epoch, loss, pairs/s and ETA.

    Lines come on logging steps (every ``every_steps`` optimizer steps, the ones Lightning writes
    to its loggers) at most once per ``interval_s`` seconds, and at the last step. Reading
    the loss is a host-device sync, so it happens only for a line. The rate is measured over the
    pairs since the previous line: the current speed, not the average since the (slow) start."""

    def __init__(self, every_steps: int, interval_s: float = 30.0) -> None:
        self.every_steps = every_steps
        self.interval_s = interval_s
        self._total: float = math.inf
        self._step = 0  # the global step of the last line
        self._since = 0.0  # when that line was written (or training started)
        self._pairs = 0  # trained since then
        self._written = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.estimated_stepping_batches  # -1 or inf for a loader without length and no max_steps
        self._total = total if total > 0 else math.inf
        self._step = trainer.global_step  # a resumed run starts where it stopped
        self._since = time.monotonic()
        self._pairs = 0
        self._written = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        self._pairs += batch["image"].shape[0] * trainer.world_size
        step = trainer.global_step
        if step == self._step or (step % self.every_steps and step != self._total):
            return  # mid-accumulation, or not a logging step
        now = time.monotonic()
        if self._written and now - self._since < self.interval_s and step != self._total:
            return  # one line per interval; the first comes at once, to show the run is going
        self._write(trainer, step, now)

    def _write(self, trainer: L.Trainer, step: int, now: float) -> None:
        elapsed = max(now - self._since, 1e-9)
        steps_per_s = (step - self._step) / elapsed
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"step {step}" + (f"/{self._total}" if math.isfinite(self._total) else ""),
                 f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}",
                 "loss " + ("-" if loss is None else f"{float(loss):.4f}"),  # every sample unreadable: no loss
                 f"{self._pairs / elapsed:.1f} pairs/s"]
        if math.isfinite(self._total):
            eta = (self._total - step) / steps_per_s
            parts.append(f"ETA {timedelta(seconds=round(eta))}")
        log.info(", ".join(parts))
        self._step, self._since, self._pairs, self._written = step, now, 0, True
