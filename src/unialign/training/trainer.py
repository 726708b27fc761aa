"""Wiring a config into a Lightning Trainer: strategy, precision, checkpoints, loggers, resume."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from ..config import Config, ConfigError, save_config
from ..data import RetrievalDataModule
from ..files import atomic_path, write_json_atomic
from ..model.factory import create_tokenizer
from ..model.smke import SharedBlock
from .module import SMKETraining

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
FINAL = "final.ckpt"
SUMMARY = "summary.json"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file and rename, so a crash never leaves a half-written checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class _RunEnd(Callback):
    """Writes ``last.ckpt``, ``final.ckpt`` and ``summary.json`` when training ends, in the
    process(es) that trained: under ``ddp_spawn`` the launching process gets the weights back but
    neither the optimizer nor the loop's progress, so a checkpoint written there would resume
    from step 0."""

    def __init__(self, output: Path) -> None:
        self.output = output

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.output / CHECKPOINT_DIR / LAST)
        trainer.save_checkpoint(self.output / CHECKPOINT_DIR / FINAL, weights_only=True)
        # Counters are per rank; the summary reports the whole run.
        counters = torch.tensor([pl_module.samples_seen, pl_module.samples_bad], dtype=torch.float64,
                                device=pl_module.device)
        seen, bad = trainer.strategy.reduce(counters, reduce_op="sum").tolist()
        stats = trainer.datamodule.stats
        summary = {
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "world_size": trainer.world_size,
            "samples_seen": int(seen),
            "samples_bad": int(bad),
            "empty_captions_skipped": stats.get("train_skipped_empty", 0),
            "data": stats,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "final_checkpoint": str(self.output / CHECKPOINT_DIR / FINAL),
        }
        if trainer.is_global_zero:
            write_json_atomic(self.output / SUMMARY, summary)
        trainer.strategy.barrier("unialign-summary")  # every rank's train() reads it next


def _strategy(cfg: Config) -> Strategy | str:
    t = cfg.train
    if t.strategy in ("ddp", "ddp_spawn"):
        # The memory bank is a buffer identical on every rank; broadcasting it each step costs
        # ~200 MB of traffic for nothing.
        return DDPStrategy(start_method="spawn" if t.strategy == "ddp_spawn" else "popen", broadcast_buffers=False)
    if t.strategy == "fsdp":
        return FSDPStrategy(state_dict_type="full", **fsdp_options())
    return t.strategy


def fsdp_options() -> dict[str, Any]:
    """How FSDP wraps the training module (also used by the FSDP test, which runs torch's FSDP
    directly: Lightning has none on CPU).

    One unit per Transformer block of the image tower and teacher (timm ViT), text tower (BERT)
    and shared block. ``use_orig_params``: the frozen teacher's embeddings and norm share the
    root unit with trainable parameters, which flat parameters without it cannot mix.
    """
    from timm.models.vision_transformer import Block
    from transformers.models.bert.modeling_bert import BertLayer

    return {"auto_wrap_policy": {Block, BertLayer, SharedBlock}, "use_orig_params": True}


def _loggers(cfg: Config, output: Path) -> list[Logger]:
    loggers: list[Logger] = []
    for name in cfg.train.loggers:
        if name == "csv":
            loggers.append(CSVLogger(save_dir=output, name="logs"))
        elif name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=output, name="tensorboard"))
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(save_dir=str(output), project="unialign"))
    return loggers


def build_trainer(cfg: Config, output: Path, callbacks: list[Callback] | None = None) -> L.Trainer:
    t = cfg.train
    checkpointing = ModelCheckpoint(dirpath=output / CHECKPOINT_DIR, filename="step{step:08d}",
                                    auto_insert_metric_name=False, every_n_train_steps=t.checkpoint_every_steps,
                                    save_top_k=1, save_last=True)
    extra: list[Callback] = [checkpointing]
    if t.progress_bar:
        # Refreshing reads the logged device tensors (a host sync): only on logging steps, which sync anyway.
        extra.append(TQDMProgressBar(refresh_rate=t.log_every_steps))
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=_strategy(cfg),
        precision=t.precision, max_epochs=t.epochs, max_steps=t.max_steps,
        gradient_clip_val=t.grad_clip, accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_steps, val_check_interval=t.val_every_steps,
        check_val_every_n_epoch=None if t.val_every_steps else 1,
        callbacks=extra + (callbacks or []), logger=_loggers(cfg, output) or False,
        enable_progress_bar=t.progress_bar, use_distributed_sampler=False, plugins=[AtomicCheckpointIO()],
        default_root_dir=output, num_sanity_val_steps=0, enable_model_summary=False,
    )


def resume_checkpoint(output: Path) -> Path:
    """The newest full checkpoint of a run: last.ckpt, or a periodic step checkpoint written after it.

    Every `checkpoint_every_steps` Lightning writes stepNNN.ckpt and then last.ckpt; a run killed
    between the two (seconds for a large model, measured on an H100 with FSDP) leaves the step
    checkpoint newer than last.ckpt, or the only one. Both are written atomically, so the newest
    file is complete."""
    found = [p for p in (output / CHECKPOINT_DIR).glob("*.ckpt") if p.name == LAST or p.name.startswith("step")]
    if not found:
        raise FileNotFoundError(f"--resume given but {output / CHECKPOINT_DIR} holds no checkpoint "
                                f"({LAST} or step*.ckpt)")
    newest = max(found, key=lambda p: p.stat().st_mtime_ns)
    if newest.name != LAST:
        log.warning("resuming from %s: it is newer than %s (the run stopped between the two writes)", newest, LAST)
    return newest


def train(cfg: Config, output: str | Path, resume: bool = False,
          callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train from a validated config; `resume` continues from the output directory's last checkpoint."""
    output = Path(output)
    if cfg.train.strategy == "fsdp" and not torch.cuda.is_available():
        raise ConfigError("train.strategy: fsdp needs a GPU and this machine has none visible; "
                          "use train.strategy: ddp")
    last = output / CHECKPOINT_DIR / LAST
    if resume:
        last = resume_checkpoint(output)
    elif last.is_file():
        raise FileExistsError(f"{output} already holds a run ({last}); pass --resume to continue it "
                              "or choose another --output")
    output.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output / "config.yaml")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = create_tokenizer(cfg)
    module = SMKETraining(cfg.model_dump(mode="json"), tokenizer=tokenizer, output_dir=str(output))
    teacher_transform = None
    if module.teacher is not None and cfg.teacher.view == "separate":
        teacher_transform = module.teacher.train_transform(cfg.data)
    datamodule = RetrievalDataModule(cfg.data, tokenizer, cfg.model.text.max_length, cfg.train.batch_size,
                                     cfg.seed, teacher_transform=teacher_transform)
    if resume:
        datamodule.read_checkpoint(last)  # FSDP builds the train loader before it reads the checkpoint
    trainer = build_trainer(cfg, output, [*(callbacks or []), _RunEnd(output)])
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None, weights_only=True)
    summary = json.loads((output / SUMMARY).read_text())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning leaves the process group up; a gloo group torn down at interpreter exit can
        # abort the process ("terminate called without an active exception") after a good run.
        torch.distributed.destroy_process_group()
    return summary
