"""The training step: teacher targets -> student embeddings -> ITC + KD losses -> metrics."""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from ..config import Config
from ..data.sampler import derive_seed
from ..evaluation import retrieval_metrics
from ..files import storage_error
from ..losses import ContrastiveDistillationLoss, ContrastiveLoss, MSEDistillationLoss
from ..model.factory import create_student, read_checkpoint, student_state_dict, tower_meta, upgrade_checkpoint
from ..model.teacher import Teacher

log = logging.getLogger(__name__)
# on_before_batch_transfer below serves the teacher cache; the data module defines no such hook,
# so Lightning's note that the module's hook wins over the data module's is noise.
warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule`")
# The frozen teacher is in eval mode on purpose (the student is switched to train in on_fit_start).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

# Parameter names that get no weight decay besides 1-d tensors (biases, norms, scales): embeddings.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "embeddings", "token_type", "reg_token")
FSDP_WRAPPED = "_fsdp_wrapped_module."  # what FSDP inserts into the names of the parameters it wraps
DROPOUT_STREAM = 7  # tags the per-rank dropout seed: derive_seed(seed, DROPOUT_STREAM, rank)
# Device types with a fused AdamW kernel in torch (>= 2.4 for CPU).
FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu", "mps")


BAD_FRACTION_Z = 4.0  # one-sided normal quantile of the bad-sample guard: P(Z > 4) = 3.2e-5
BAD_FRACTION_CONFIDENCE = "99.997%"


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


class SMKETraining(L.LightningModule):
    def __init__(self, config: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None = None,
                 output_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.cfg = Config.model_validate(config)
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir) if output_dir else None
        # The teacher is frozen and rebuilt from the config, so it stays out of checkpoints.
        self.strict_loading = False
        # With teacher.cache the targets are read from disk (looked up per batch in
        # on_before_batch_transfer) and the teacher is never built.
        self.teacher_cache = None
        self.teacher: Teacher | None = None
        if self.cfg.teacher.enabled and self.cfg.teacher.cache is not None:
            from .teacher_cache import TeacherCache

            self.teacher_cache = TeacherCache.open(self.cfg.teacher.cache, self.cfg)
            kd_dim = self.teacher_cache.dim
        elif self.cfg.teacher.enabled and self.cfg.loss.kd != "none":
            # Own RNG stream: the student's initialisation (and dropout) must not depend on
            # whether the teacher is built here or its targets come from a cache.
            with torch.random.fork_rng(devices=[]):
                self.teacher = Teacher(self.cfg.teacher)
            kd_dim = self.teacher.width
        else:
            kd_dim = None
        self.kd_dim = kd_dim
        self.model = create_student(self.cfg, kd_dim)
        if self.cfg.model.init_checkpoint is not None:
            self._init_from(self.cfg.model.init_checkpoint)
        if self.cfg.train.compile:
            # In place (nn.Module.compile): parameter names and checkpoints stay the same.
            for part in (self.model.image_tower, self.model.text_tower, *self.model.shared):
                part.compile()
            if self.teacher is not None:
                self.teacher.backbone.compile()
        self.itc = ContrastiveLoss()
        loss = self.cfg.loss
        self.kd: torch.nn.Module | None = None
        if loss.kd == "contrastive":
            self.kd = ContrastiveDistillationLoss(kd_dim, bank_size=loss.bank_size, temperature=loss.kd_temperature,
                                                  learnable_temperature=loss.kd_learnable_temperature)
        elif loss.kd == "mse":
            self.kd = MSEDistillationLoss()
        # Decided here, on the real shapes: once FSDP has wrapped the module (use_orig_params),
        # every parameter shows as a 1-d view of its shard, and ndim would say "no decay" for all.
        self._no_decay = {name for name, p in self.named_parameters()
                          if p.ndim < 2 or any(key in name for key in NO_DECAY_NAMES)}
        self._lr_scale = {f"model.{name}": scale for name, scale in
                          self.model.lr_scales(self.cfg.train.tower_lr_scale, self.cfg.train.layer_decay).items()}
        self.samples_seen = 0
        self.samples_bad = 0
        self._rng_restored = False  # set when a checkpoint's RNG states are loaded (resume)
        self._last_step_time: float | None = None
        self._pairs_per_sec: float | None = None
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _init_from(self, path: Path) -> None:
        """Start from a trained model (e.g. retrieval fine-tuning).

        The optional parts (KD head, second logit scale) are taken only where the new
        configuration has them with the same shape; every other weight must match.
        """
        own = self.model.state_dict()
        optional = ("kd_head.", "logit_scale_interm")
        state = {k: v for k, v in student_state_dict(read_checkpoint(path)).items()
                 if not k.startswith(optional) or (k in own and own[k].shape == v.shape)}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        wrong = [k for k in missing if not k.startswith(optional)]
        if wrong or unexpected:
            raise ValueError(f"model.init_checkpoint {path} does not match the configured model: "
                             f"missing {wrong[:5]}, unexpected {unexpected[:5]}")
        log.info("initialised the model from %s", path)

    # ----------------------------------------------------------------------------- training

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image_ids = batch["image_id"] if self.cfg.loss.same_image_positives else None
        img, txt = self.model(batch["image"], batch["input_ids"], batch["attention_mask"])
        scale, scale_interm = self.model.scales()
        itc = self.itc(img.embedding, txt.embedding, scale, image_ids)
        out = {"itc": itc}
        if self.cfg.loss.itc_interm:
            out["itc_interm"] = self.itc(img.interm, txt.interm, scale_interm, image_ids)
            itc = (itc + out["itc_interm"]) / 2
        loss = self.cfg.loss.itc_weight * itc
        if self.kd is not None:
            targets = batch.get("teacher_target")  # from the teacher cache, set before the device transfer
            if targets is None:
                if self.teacher is None:
                    raise RuntimeError("teacher.cache is set but the batch has no teacher_target "
                                       "(the cache lookup runs in on_before_batch_transfer)")
                targets = self.teacher(batch.get("teacher_image", batch["image"]))
            out["kd"] = self.kd(img.kd.float(), txt.kd.float(), targets, image_ids)
            loss = loss + self.cfg.loss.kd_weight * out["kd"]
        out["loss"] = loss
        return out

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With a teacher cache: look the batch's targets up on the host, so they travel to the
        device with the batch (no teacher, no device sync; an unknown image id is an error)."""
        if (self.teacher_cache is not None and self._trainer is not None and self.trainer.training
                and isinstance(batch, dict) and "image_id" in batch):
            target = self.teacher_cache.lookup(batch["image_id"])
            batch["teacher_target"] = target.pin_memory() if self.device.type == "cuda" else target
        return batch

    def on_fit_start(self) -> None:
        # transformers loads pretrained towers in eval mode and Lightning keeps every module's
        # mode, so without this BERT's dropout would stay off for the whole run. (The teacher
        # ignores it: Teacher.train always sets eval.)
        self.model.train()
        if not self._rng_restored:
            # One dropout stream per rank, drawn after the (identical) initialisation: with the
            # same stream everywhere, ranks whose batches have the same shapes (caption lengths
            # are rounded to a multiple of 8) would draw the same masks at every step.
            torch.manual_seed(derive_seed(self.cfg.seed, DROPOUT_STREAM, self.global_rank))

    def on_train_start(self) -> None:
        if self.teacher_cache is None:
            return
        if not (self.cfg.data.train_scale == (1.0, 1.0) and not self.cfg.data.hflip):
            log.warning("teacher.cache holds targets of the un-augmented image while the student is trained on "
                        "augmented views (data.train_scale=%s, data.hflip=%s): the cached targets approximate "
                        "the online ones", list(self.cfg.data.train_scale), self.cfg.data.hflip)
        # Map-style sources are checked up front; shard sources per batch.
        for source in getattr(self.trainer.datamodule, "train_sources", None) or []:
            if hasattr(source, "records"):
                self.teacher_cache.check_records(source.records, source.source)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self._account_bad_samples(batch)
        if batch["size"] == 0:  # every sample of the batch was unreadable: nothing to learn from
            return None
        out = self._losses(batch)
        for name, value in out.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", on_step=True, on_epoch=False,
                     batch_size=batch["image"].shape[0])
        self.log("train/logit_scale", self.model.scales()[0], on_step=True, on_epoch=False)
        return out["loss"]

    def _account_bad_samples(self, batch: dict[str, Any]) -> None:
        """Unreadable samples are skipped, counted, listed; too many of them stop the run.

        "Too many" is judged with a one-sided confidence bound, not the raw fraction: the run
        stops once the Wilson score lower bound (z = 4, about 99.997% one-sided) of the bad
        fraction exceeds ``data.max_bad_fraction``. A few bad samples among the first hundreds
        say little (3 of 256 is 1.2% but fits a 0.1%-bad data set), so they no longer stop a run
        whose data is good; mostly bad data still stops within the first batches (5 of 8 bad
        gives a bound of 13.8%, 32 of 64 one of 27.6%); and over a long run the bound closes in on
        the true fraction, so data just above the limit is stopped once that is clear. With
        ``max_bad_fraction: 0`` any bad sample stops the run (its bound is above 0)."""
        n_bad = int(batch.get("n_skipped", 0))
        self.samples_seen += int(batch["size"]) + n_bad
        self.samples_bad += n_bad
        if n_bad and self.output_dir is not None:
            listing = self.output_dir / f"bad_samples.rank{self.global_rank}.tsv"
            try:
                with open(listing, "a") as f:
                    for path, reason in batch.get("skipped", []):
                        f.write(f"{path}\t{reason}\n")
            except OSError as err:
                clear = storage_error(err, listing)  # a full disk: one line naming the file
                if clear is None:
                    raise
                raise clear from None
        # A CPU tensor: a Python number would be copied to the device by self.log, a host sync per step.
        self.log("data/bad_samples", torch.tensor(float(self.samples_bad)), on_step=True, on_epoch=False,
                 reduce_fx="sum")
        limit = self.cfg.data.max_bad_fraction
        lower = bad_fraction_lower_bound(self.samples_bad, self.samples_seen)
        if lower > limit:
            raise BadDataError(
                f"{self.samples_bad} of {self.samples_seen} training samples were unreadable "
                f"({100 * self.samples_bad / self.samples_seen:.1f}%; with {BAD_FRACTION_CONFIDENCE} confidence "
                f"at least {100 * lower:.1f}% of the data is), more than data.max_bad_fraction={limit}; "
                f"see bad_samples.rank*.tsv in the output directory")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.model.clamp_scales_()
        if isinstance(self.kd, ContrastiveDistillationLoss):
            self.kd.clamp_temperature_()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            world = self.trainer.world_size
            rate = batch["image"].shape[0] * world / max(now - self._last_step_time, 1e-9)
            self._pairs_per_sec = rate if self._pairs_per_sec is None else 0.9 * self._pairs_per_sec + 0.1 * rate
            self.log("pairs_per_sec", torch.tensor(self._pairs_per_sec), prog_bar=True, on_step=True,
                     on_epoch=False, rank_zero_only=True)
        self._last_step_time = now

    # --------------------------------------------------------------------------- validation

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        img = self.model.encode_image(batch["image"])
        txt = self.model.encode_text({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        self._val_outputs.append((img.float(), txt.float(), batch["image_id"]))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        img, txt, ids = (torch.cat(x) for x in zip(*self._val_outputs))
        self._val_outputs.clear()
        if self.trainer.world_size > 1:
            img, txt, ids = (self._gather_uneven(x) for x in (img, txt, ids))
        # Pairs repeat an image once per caption: keep one embedding per image id.
        unique_ids, caption_to_image = torch.unique(ids, return_inverse=True)
        first = torch.full((len(unique_ids),), len(ids), dtype=torch.long, device=ids.device)
        first.scatter_reduce_(0, caption_to_image, torch.arange(len(ids), device=ids.device), reduce="amin")
        metrics = retrieval_metrics(img[first], txt, caption_to_image)
        for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
            self.log(f"val/{key}", metrics[key], prog_bar=key == "r_mean", sync_dist=False)

    def _gather_uneven(self, x: torch.Tensor) -> torch.Tensor:
        """all_gather for per-rank tensors whose first dimension differs (validation shards)."""
        sizes = self.all_gather(torch.tensor(len(x), device=x.device)).flatten().tolist()
        padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: len(x)] = x
        gathered = self.all_gather(padded)
        return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])

    # ---------------------------------------------------------------------------- optimiser

    def _fused_adamw(self) -> bool:
        """Fused AdamW wherever torch has the kernel (one kernel per step: on CUDA it also checks
        fp16 inf/NaN on the device, no sync; on CPU it is ~20x faster than the per-tensor loop),
        except with gradient clipping under mixed precision: a fused optimizer unscales inside its
        step, after the point where Lightning clips, and Lightning refuses the combination (for
        bf16-mixed too)."""
        t = self.cfg.train
        return self.device.type in FUSED_ADAMW_DEVICES and not (t.grad_clip and t.precision != "32-true")

    def weight_decay_split(self) -> dict[str, bool]:
        """Trained parameter name -> whether it gets weight decay (names as before any FSDP wrapping)."""
        names = ((name.replace(FSDP_WRAPPED, ""), p) for name, p in self.named_parameters())
        return {name: name not in self._no_decay for name, p in names if p.requires_grad}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """AdamW groups: one per (weight decay or not, learning-rate multiplier) pair, in a fixed order."""
        t = self.cfg.train
        split = self.weight_decay_split()
        groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                name = name.replace(FSDP_WRAPPED, "")
                groups.setdefault((split[name], self._lr_scale.get(name, 1.0)), []).append(param)
        order = sorted(groups, key=lambda key: (not key[0], -key[1]))  # decayed first, then by rate
        return [{"params": groups[key], "weight_decay": t.weight_decay if key[0] else 0.0, "lr": lr * key[1]}
                for key in order]

    def configure_optimizers(self) -> dict[str, Any]:
        t = self.cfg.train
        global_batch = t.batch_size * self.trainer.world_size * t.accumulate_grad_batches
        lr = t.base_lr * global_batch / 256 if t.scale_lr else t.base_lr
        optimizer = torch.optim.AdamW(self.param_groups(lr), lr=lr, betas=t.betas, eps=t.eps,
                                      fused=self._fused_adamw())
        self.trainer.estimated_stepping_batches  # sets up the train loader so its length is known
        total = math.ceil(self.trainer.num_training_batches / t.accumulate_grad_batches) * t.epochs  # optimizer steps
        total = min(total, t.max_steps) if t.max_steps > 0 else total  # so a cut run ends at the cosine's end
        scheduler = get_cosine_schedule_with_warmup(optimizer, int(t.warmup_fraction * total), total)
        log.info("lr %.3g (base %.3g, global batch %d), %d steps, %d warm-up", lr, t.base_lr, global_batch,
                 total, int(t.warmup_fraction * total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        if self.tokenizer is not None:
            checkpoint["unialign"] = tower_meta(self.model, self.tokenizer, self.kd_dim)
        checkpoint["unialign_counters"] = {"seen": self.samples_seen, "bad": self.samples_bad}
        # Every rank's RNG state (ranks draw different dropout masks); every rank runs this hook.
        state = self._rng_state()
        world = self._trainer.world_size if self._trainer is not None else 1  # detached after ddp_spawn
        if world > 1 and torch.distributed.is_initialized():
            states: list[Any] = [None] * world
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["rng"] = states

    def _rng_state(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
                 "python": random.getstate()}
        if self.device.type == "cuda":  # dropout on the GPU draws from the device's generator
            state["cuda"] = torch.cuda.get_rng_state(self.device).cpu()
        return state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_checkpoint(checkpoint)  # before Lightning loads its weights and optimizer state
        counters = checkpoint.get("unialign_counters", {})
        self.samples_seen = counters.get("seen", 0)
        self.samples_bad = counters.get("bad", 0)
        states = checkpoint.get("rng")
        if not states:
            return
        if isinstance(states, dict):  # written before checkpoints kept one state per rank
            states = [states]
        world = self._trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank
        if len(states) != world:
            log.warning("the checkpoint holds RNG states of %d rank(s), this run has %d: dropout masks will not "
                        "match the interrupted run", len(states), world)
        rng = states[rank % len(states)]
        torch.set_rng_state(rng["torch"])
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], torch.cuda.current_device())
        self._rng_restored = True
