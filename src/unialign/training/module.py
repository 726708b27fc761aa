"""The Lightning side of training: the `DistillTask` step, validation retrieval, optimiser, checkpoints.

Bad-sample accounting and the pairs/s meter are callbacks (`callbacks.py`), added by `build_trainer`."""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from ..config import Config, TrainConfig
from ..data.sampler import derive_seed
from ..evaluation import retrieval_metrics
from ..model.factory import inference_config
from ..model.smke import param_groups as adamw_groups
from ..report import RECALL_KEYS
from .task import DistillTask

log = logging.getLogger(__name__)
# on_before_batch_transfer below serves the teacher cache; the data module defines no such hook,
# so Lightning's note that the module's hook wins over the data module's is noise.
warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule`")
# The frozen teacher is in eval mode on purpose (the student is switched to train in on_fit_start).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

FSDP_WRAPPED = "_fsdp_wrapped_module."  # what FSDP inserts into the names of the parameters it wraps
DROPOUT_STREAM = 7  # tags the per-rank dropout seed: derive_seed(seed, DROPOUT_STREAM, rank)
# Device types with a fused AdamW kernel in torch (>= 2.4 for CPU).
FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu", "mps")


class SMKETraining(L.LightningModule):
    """A run's LightningModule: `task` (a `DistillTask`) computes the losses, this module logs them and
    adds the teacher cache lookup, validation retrieval, the optimiser and RNG checkpointing."""

    task: DistillTask  # its modules are this module's `teacher`, `model`, `itc`, `kd` (and momentum parts)

    def __init__(self, config: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.cfg = Config.model_validate(config)
        self.tokenizer = tokenizer
        # The teacher is frozen and rebuilt from the config, so it stays out of checkpoints.
        self.strict_loading = False
        # With teacher.cache the targets are read from disk (looked up per batch in
        # on_before_batch_transfer) and the teacher is never built.
        self.teacher_cache = None
        if self.cfg.teacher.enabled and self.cfg.teacher.cache is not None:
            from .teacher_cache import TeacherCache

            self.teacher_cache = TeacherCache.open(self.cfg.teacher.cache, self.cfg)
        task = DistillTask.from_config(self.cfg, self.teacher_cache.dim if self.teacher_cache is not None else None)
        # The task's modules are registered here, under the names checkpoints have always had
        # (teacher., model., itc., kd., in that order); the task itself is a plain attribute, not a
        # submodule, so no "task." enters the names. `self.task(batch)` is the training step's forward.
        self.teacher = task.teacher
        self.model = task.model
        self.itc = task.itc
        self.kd = task.kd
        # ALBEF's momentum model and ITC queues (loss.queue_size / loss.mod_alpha), None otherwise:
        # in training checkpoints (a resume continues them exactly), not in weights-only ones.
        self.momentum_model = task.momentum_model
        self.itc_momentum = task.itc_momentum
        object.__setattr__(self, "task", task)
        self.kd_dim = task.kd_dim
        self._no_decay = task.no_weight_decay()
        self._lr_scale = task.lr_scales(self.cfg.train.tower_lr_scale, self.cfg.train.layer_decay)
        self._rng_restored = False  # set when a checkpoint's RNG states are loaded (resume)
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # ----------------------------------------------------------------------------- training

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With a teacher cache: look the batch's targets up on the host, so they travel to the
        device with the batch (no teacher, no device sync; an unknown image id is an error). With
        frozen-prefix caches: plan which stored rows the batch reads and fills, likewise."""
        if not (self._trainer is not None and self.trainer.training and isinstance(batch, dict)
                and "image_id" in batch):
            return batch
        if self.teacher_cache is not None:
            target = self.teacher_cache.lookup(batch["image_id"])
            batch["teacher_target"] = target.pin_memory() if self.device.type == "cuda" else target
        self.task.plan(batch)
        return batch

    def on_fit_start(self) -> None:
        # transformers loads pretrained towers in eval mode and Lightning keeps every module's
        # mode, so without this BERT's dropout would stay off for the whole run. (The teacher
        # ignores it: Teacher.train always sets eval.)
        self.model.train()
        if self.task.momentum_model is not None:
            # MoD's warm-up lasts one epoch of optimizer steps (unknown for a loader without a length).
            batches = self.trainer.num_training_batches
            if math.isfinite(batches) and batches > 0:
                self.task.steps_per_epoch = math.ceil(batches / self.cfg.train.accumulate_grad_batches)
        if not self._rng_restored:
            # One dropout stream per rank, drawn after the (identical) initialisation: with the
            # same stream everywhere, ranks whose batches have the same shapes (caption lengths
            # are rounded to a multiple of 8) would draw the same masks at every step.
            torch.manual_seed(derive_seed(self.cfg.seed, DROPOUT_STREAM, self.global_rank))

    def on_train_start(self) -> None:
        if self.teacher_cache is None:
            return
        if not self.cfg.data.unaugmented:
            log.warning("teacher.cache holds targets of the un-augmented image while the student is trained on "
                        "augmented views (data.train_scale=%s, data.hflip=%s): the cached targets approximate "
                        "the online ones", list(self.cfg.data.train_scale), self.cfg.data.hflip)
        # Map-style sources are checked up front; shard sources per batch.
        for source in getattr(self.trainer.datamodule, "train_sources", None) or []:
            if hasattr(source, "records"):
                self.teacher_cache.check_records(source.records, source.source)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch["size"] == 0:  # every sample unreadable (counted by the BadSamples callback): nothing to learn
            return None
        out = self.task(batch)
        for name, value in out.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", on_step=True, on_epoch=False,
                     batch_size=batch["image"].shape[0])
        self.log("train/logit_scale", self.model.scales()[0], on_step=True, on_epoch=False)
        return out["loss"]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.task.after_optimizer_step()

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
        for key in RECALL_KEYS:
            self.log(f"val/{key}", metrics[key], prog_bar=key == "r_mean", sync_dist=False)

    def _gather_uneven(self, x: torch.Tensor) -> torch.Tensor:
        """all_gather for per-rank tensors whose first dimension differs (validation shards)."""
        sizes = self.all_gather(torch.tensor(len(x), device=x.device)).flatten().tolist()
        padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: len(x)] = x
        gathered = self.all_gather(padded)
        return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])

    # ---------------------------------------------------------------------------- optimiser

    def fused_adamw(self) -> bool:
        """Fused AdamW wherever torch has the kernel (one kernel per step: on CUDA it also checks
        fp16 inf/NaN on the device, no sync; on CPU it is ~20x faster than the per-tensor loop),
        except with gradient clipping under mixed precision: a fused optimizer unscales inside its
        step, after the point where Lightning clips, and Lightning refuses the combination (for
        bf16-mixed too)."""
        return fused_adamw(self.device, self.cfg.train)

    def _named_unwrapped(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name.replace(FSDP_WRAPPED, ""), p) for name, p in self.named_parameters()]

    def weight_decay_split(self) -> dict[str, bool]:
        """Trained parameter name -> whether it gets weight decay (names as before any FSDP wrapping)."""
        return {name: name not in self._no_decay for name, p in self._named_unwrapped() if p.requires_grad}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """AdamW groups: one per (weight decay or not, learning-rate multiplier) pair, in a fixed order."""
        return adamw_groups(self._named_unwrapped(), self.cfg.train.weight_decay, self._no_decay, lr, self._lr_scale)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self.trainer, self.cfg.train, self.param_groups, self.fused_adamw())

    # --------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Weights-only checkpoints (final.ckpt: Lightning leaves out the optimizer) are for inference,
        # which needs the student alone: the momentum model and the queues are training state.
        dropped = ("teacher.",) if "optimizer_states" in checkpoint else ("teacher.", "momentum_model.", "itc_momentum.")
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(dropped)}
        if self.tokenizer is not None:
            checkpoint["unialign"] = inference_config(self.model, self.cfg, self.tokenizer, self.kd_dim).to_checkpoint()
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
        states = checkpoint.get("rng")
        if not states:
            return
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


# The optimiser recipe as functions, so other Lightning modules (training/hf_dual.py) train with it too.


def fused_adamw(device: torch.device, t: TrainConfig) -> bool:
    """Whether AdamW runs fused on `device` under the train config `t` (see `SMKETraining.fused_adamw`)."""
    return device.type in FUSED_ADAMW_DEVICES and not (t.grad_clip and t.precision != "32-true")


def adamw_warmup_cosine(trainer: L.Trainer, t: TrainConfig, param_groups: Callable[[float], list[dict[str, Any]]],
                        fused: bool) -> dict[str, Any]:
    """`configure_optimizers`' answer: AdamW over `param_groups(lr)`, lr = base_lr scaled to the global
    batch (train.scale_lr), linear warm-up then cosine to 0 over the run's optimizer steps."""
    global_batch = t.batch_size * trainer.world_size * t.accumulate_grad_batches
    lr = t.base_lr * global_batch / 256 if t.scale_lr else t.base_lr
    optimizer = torch.optim.AdamW(param_groups(lr), lr=lr, betas=t.betas, eps=t.eps, fused=fused)
    trainer.estimated_stepping_batches  # sets up the train loader so its length is known
    total = math.ceil(trainer.num_training_batches / t.accumulate_grad_batches) * t.epochs  # optimizer steps
    total = min(total, t.max_steps) if t.max_steps > 0 else total  # so a cut run ends at the cosine's end
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(t.warmup_fraction * total), total)
    log.info("lr %.3g (base %.3g, global batch %d), %d steps, %d warm-up", lr, t.base_lr, global_batch,
             total, int(t.warmup_fraction * total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
