"""Callbacks of every training run (added by `build_trainer`): unreadable-sample accounting and the pairs/s meter."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..files import storage_error

BAD_FRACTION_Z = 4.0  # one-sided normal quantile of the bad-sample guard: P(Z > 4) = 3.2e-5
BAD_FRACTION_CONFIDENCE = "99.997%"
COUNTERS = "unialign_counters"  # the checkpoint entry of the counters, so a resumed run keeps counting


def bad_fraction_lower_bound(bad: int, seen: int, z: float = BAD_FRACTION_Z) -> float:
    """Wilson score lower confidence bound of a fraction from `bad` of `seen` samples.

    Unlike the normal approximation it is well behaved for small counts and fractions near 0
    or 1: 0 when nothing is bad, above 0 as soon as one sample is, below bad/seen always."""
    if seen <= 0 or bad <= 0:
        return 0.0
    p = bad / seen
    z2 = z * z
    centre = p + z2 / (2 * seen)
    spread = z * math.sqrt(p * (1 - p) / seen + z2 / (4 * seen * seen))
    return max(0.0, (centre - spread) / (1 + z2 / seen))


class BadDataError(RuntimeError):
    """Too much of the training data is unreadable to trust the run."""


class BadSamples(Callback):
    """Unreadable samples are skipped (by the data), counted, listed; too many of them stop the run.

    Counts are per rank (`seen`, `bad`; the run's summary adds them up) and travel in checkpoints.
    Each rank lists its bad samples in ``bad_samples.rank{R}.tsv`` in `output` (path, reason).

    "Too many" is judged with a one-sided confidence bound, not the raw fraction: the run
    stops once the Wilson score lower bound (z = 4, about 99.997% one-sided) of the bad
    fraction exceeds ``data.max_bad_fraction``. A few bad samples among the first hundreds
    say little (3 of 256 is 1.2% but fits a 0.1%-bad data set), so they no longer stop a run
    whose data is good; mostly bad data still stops within the first batches (5 of 8 bad
    gives a bound of 13.8%, 32 of 64 one of 27.6%); and over a long run the bound closes in on
    the true fraction, so data just above the limit is stopped once that is clear. With
    ``max_bad_fraction: 0`` any bad sample stops the run (its bound is above 0)."""

    def __init__(self, max_bad_fraction: float, output: Path | None = None) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.output = output
        self.seen = 0
        self.bad = 0

    def update(self, batch: dict[str, Any], rank: int = 0) -> None:
        """Count a batch (its ``size`` readable samples, ``n_skipped`` unreadable ones, listed in
        ``skipped``); raises :class:`BadDataError` when the data is too bad to go on."""
        n_bad = int(batch.get("n_skipped", 0))
        self.seen += int(batch["size"]) + n_bad
        self.bad += n_bad
        if n_bad and self.output is not None:
            listing = self.output / f"bad_samples.rank{rank}.tsv"
            try:
                with open(listing, "a") as f:
                    for path, reason in batch.get("skipped", []):
                        f.write(f"{path}\t{reason}\n")
            except OSError as err:
                clear = storage_error(err, listing)  # a full disk: one line naming the file
                if clear is None:
                    raise
                raise clear from None
        limit = self.max_bad_fraction
        lower = bad_fraction_lower_bound(self.bad, self.seen)
        if lower > limit:
            raise BadDataError(
                f"{self.bad} of {self.seen} training samples were unreadable "
                f"({100 * self.bad / self.seen:.1f}%; with {BAD_FRACTION_CONFIDENCE} confidence "
                f"at least {100 * lower:.1f}% of the data is), more than data.max_bad_fraction={limit}; "
                f"see bad_samples.rank*.tsv in the output directory")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.update(batch, trainer.global_rank)
        # A CPU tensor: a Python number would be copied to the device by log, a host sync per step.
        pl_module.log("data/bad_samples", torch.tensor(float(self.bad)), on_step=True, on_epoch=False,
                      reduce_fx="sum")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[COUNTERS] = {"seen": self.seen, "bad": self.bad}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get(COUNTERS, {})
        self.seen = counters.get("seen", 0)
        self.bad = counters.get("bad", 0)


class PairsPerSecond(Callback):
    """Logs ``pairs_per_sec`` on global rank 0 after every batch: image-text pairs of all ranks per
    second, an exponential moving average (0.9) of the time between batch ends."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self._last: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            rate = batch["image"].shape[0] * trainer.world_size / max(now - self._last, 1e-9)
            self.rate = rate if self.rate is None else 0.9 * self.rate + 0.1 * rate
            pl_module.log("pairs_per_sec", torch.tensor(self.rate), prog_bar=True, on_step=True, on_epoch=False,
                          rank_zero_only=True)
        self._last = now
