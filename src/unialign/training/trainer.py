"""Wiring a config into a Lightning Trainer: strategy, precision, checkpoints, loggers, resume."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from ..config import Config, ConfigError, save_config
from ..files import remove_stale_temp_files, torch_save_atomic, write_json_atomic
from ..model.factory import LOAD_ERRORS, CheckpointError, checkpoint_damage, create_tokenizer, unreadable_checkpoint
from ..model.smke import SharedBlock
from .callbacks import BadSamples, PairsPerSecond
from .datamodule import RetrievalDataModule
from .module import SMKETraining
from .progress import ProgressLog

log = logging.getLogger(__name__)
# Lightning's own pytree helper calls what torch deprecated; nothing in our code to change.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
FINAL = "final.ckpt"
SUMMARY = "summary.json"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file and rename, so a crash never leaves a half-written checkpoint.

    A full disk or a read-only folder raises :class:`~unialign.files.WriteError` naming the
    checkpoint; a damaged checkpoint given to resume raises :class:`CheckpointError` naming it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        torch_save_atomic(checkpoint, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        kwargs = {} if map_location is None else {"map_location": map_location}
        try:
            return super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        except LOAD_ERRORS as err:
            raise unreadable_checkpoint(path, err) from None


class _StepCheckpoint(ModelCheckpoint):
    """The periodic checkpoints (stepNNN.ckpt, then last.ckpt) during training.

    Lightning's ModelCheckpoint also writes last.ckpt at train end when no periodic save
    happened yet (any run shorter than ``checkpoint_every_steps``); it runs after `_RunEnd`, which
    has just written last.ckpt, and its version counter then named its copy ``last-v1.ckpt``.
    `_RunEnd` owns the end-of-run files, so that save is dropped here, and the version counter is
    off: a name that exists is ours from an earlier write of the same run (or of the run being
    resumed, whose last.ckpt Lightning does not recognise when the folder was moved) and is
    replaced, atomically."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A run resumed after its folder was moved or renamed: its files are in the new folder
        now. Lightning would forget them (only keeping the best path, in the old folder), so the
        previous step checkpoint would never be removed; the paths are moved along instead."""
        old = state_dict.get("dirpath")
        if old and self.dirpath and os.path.abspath(old) != os.path.abspath(self.dirpath):
            here = lambda p: os.path.join(self.dirpath, os.path.basename(p)) if p else p  # noqa: E731
            state_dict = {**state_dict, "dirpath": self.dirpath,
                          **{k: here(state_dict.get(k)) for k in ("best_model_path", "kth_best_model_path",
                                                                   "last_model_path")},
                          "best_k_models": {here(p): v for p, v in (state_dict.get("best_k_models") or {}).items()}}
        super().load_state_dict(state_dict)


class _RunEnd(Callback):
    """Writes ``last.ckpt``, ``final.ckpt`` and ``summary.json`` when training ends, in the
    process(es) that trained: under ``ddp_spawn``/``ddp_fork`` the launching process gets the weights back but
    neither the optimizer nor the loop's progress, so a checkpoint written there would resume
    from step 0."""

    def __init__(self, output: Path) -> None:
        self.output = output

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.output / CHECKPOINT_DIR / LAST, weights_only=False)
        trainer.save_checkpoint(self.output / CHECKPOINT_DIR / FINAL, weights_only=True)
        # Counters are per rank (the BadSamples callback's); the summary reports the whole run.
        bad_samples = next((c for c in trainer.callbacks if isinstance(c, BadSamples)), BadSamples(1.0))
        counters = torch.tensor([bad_samples.seen, bad_samples.bad], dtype=torch.float64, device=pl_module.device)
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
    if t.strategy in ("ddp", "ddp_spawn", "ddp_fork"):
        # The memory bank is a buffer identical on every rank; broadcasting it each step costs
        # ~200 MB of traffic for nothing.
        start_method = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork"}[t.strategy]
        return DDPStrategy(start_method=start_method, broadcast_buffers=False)
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


class _NoAdvert(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger" line, logged by every Trainer that has
    no LitLogger; no Trainer argument turns it off."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


def _lightning_console() -> None:
    """Each of Lightning's log records printed once, and no adverts among them."""
    package = logging.getLogger("lightning")
    if logging.getLogger().hasHandlers():
        # The application (the CLI) configured the root logger, which Lightning's records reach; the
        # console handler Lightning's package adds on import would print each a second time.
        for handler in [h for h in package.handlers if type(h) is logging.StreamHandler]:
            package.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvert) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdvert())


def build_trainer(cfg: Config, output: Path, callbacks: list[Callback] | None = None) -> L.Trainer:
    t = cfg.train
    _lightning_console()
    checkpointing = _StepCheckpoint(dirpath=output / CHECKPOINT_DIR, filename="step{step:08d}",
                                    auto_insert_metric_name=False, every_n_train_steps=t.checkpoint_every_steps,
                                    save_top_k=1, save_last=True, enable_version_counter=False)
    # pairs/s after the progress line, which reads the metrics (as when the module logged the rate).
    extra: list[Callback] = [BadSamples(cfg.data.max_bad_fraction, output), checkpointing]
    if t.progress_bar:
        # Refreshing reads the logged device tensors (a host sync): only on logging steps, which sync anyway.
        extra.append(TQDMProgressBar(refresh_rate=t.log_every_steps))
    else:
        extra.append(ProgressLog(t.log_every_steps))
    extra.append(PairsPerSecond())
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=_strategy(cfg),
        precision=t.precision, max_epochs=t.epochs, max_steps=t.max_steps,
        gradient_clip_val=t.grad_clip, accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_steps, val_check_interval=t.val_every_steps,
        check_val_every_n_epoch=None if t.val_every_steps else 1,
        # Without a validation set Lightning would still ask for its loader, and warn that it is empty.
        limit_val_batches=None if cfg.data.val is not None else 0,
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


def run_files(output: Path) -> list[str]:
    """What in `output` belongs to a run that started checkpointing or finished: its checkpoints
    (last, final, periodic step ones) and summary.json, relative to `output`."""
    found = [f"{CHECKPOINT_DIR}/{p.name}" for p in sorted((output / CHECKPOINT_DIR).glob("*.ckpt"))
             if p.name.startswith(("last", "step")) or p.name == FINAL]
    if (output / SUMMARY).is_file():
        found.append(SUMMARY)
    return found


def _is_launching_rank() -> bool:
    """True in the process Lightning or torchrun gave global rank 0 (the one that starts the run)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


# What a resumed run may change: how it runs, not what it computes.
RESUME_MAY_CHANGE = ("data.num_workers", "train.progress_bar", "train.log_every_steps", "train.loggers",
                     "train.checkpoint_every_steps", "train.val_every_steps")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_resumed_config(cfg: Config, saved_path: Path) -> None:
    """A resumed run continues the run it resumes: a config that would compute something else
    (another lr, model, data, ...) is refused instead of silently rewriting config.yaml."""
    if not saved_path.is_file():
        return
    import yaml

    saved = _flat(yaml.safe_load(saved_path.read_text()) or {})
    now = _flat(cfg.model_dump(mode="json"))
    changed = sorted(k for k in saved.keys() | now.keys()
                     if saved.get(k) != now.get(k) and not k.startswith(RESUME_MAY_CHANGE))
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(f"--resume continues the run in {saved_path.parent}, but the config differs from its "
                          f"config.yaml ({shown}{more}); resume with the same config (only "
                          f"{', '.join(RESUME_MAY_CHANGE)} may change) or start a new run in another --output")


def _with_auto_cache(cfg: Config) -> Config:
    """``teacher.cache: auto`` -> the folder of this teacher and these training images, built by
    the launching process (the others wait for it); config.yaml keeps ``auto``."""
    from .cache_build import ensure_auto_cache

    folder = ensure_auto_cache(cfg, build=_is_launching_rank(), batch_size=cfg.train.batch_size,
                               progress=cfg.train.progress_bar)
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"cache": folder})})


def train(cfg: Config, output: str | Path, resume: bool = False,
          callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train from a validated config; `resume` continues from the output directory's last checkpoint.

    Without `resume`, an output directory that holds a run (any checkpoint or summary.json) is
    refused, so a finished run is never trained over. Temporary files of checkpoint writes that
    a killed run left behind are removed before the run starts or resumes."""
    output = Path(output)
    if cfg.train.strategy == "fsdp" and not torch.cuda.is_available():
        raise ConfigError("train.strategy: fsdp needs a GPU and this machine has none visible; "
                          "use train.strategy: ddp")
    last = output / CHECKPOINT_DIR / LAST
    if resume:
        last = resume_checkpoint(output)
        damage = checkpoint_damage(last)  # cheap: before any model or data is built
        if damage is not None:
            raise CheckpointError(f"cannot resume from {last}: {damage}; delete it to resume from an "
                                  "older step checkpoint, or start a new run in another --output")
    else:
        held = run_files(output)
        if held:
            shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
            raise FileExistsError(f"{output} already holds a run ({shown}); pass --resume to continue it "
                                  "or choose another --output")
    if _is_launching_rank():
        # The other ranks start after this one and before any checkpoint write, so nothing live is removed.
        for tmp in remove_stale_temp_files(output / CHECKPOINT_DIR):
            log.info("removed %s, left by a checkpoint write that was killed midway", tmp)
    if resume:
        _check_resumed_config(cfg, output / "config.yaml")
    output.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output / "config.yaml")
    if cfg.teacher.cache == "auto" and cfg.teacher.enabled:
        cfg = _with_auto_cache(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = create_tokenizer(cfg)
    module = SMKETraining(cfg.model_dump(mode="json"), tokenizer=tokenizer)
    teacher_transform = None
    if module.teacher is not None and cfg.teacher.view == "separate":
        teacher_transform = module.teacher.train_transform(cfg.data, cfg.teacher_image_size)
    datamodule = RetrievalDataModule(cfg.data, tokenizer, cfg.model.text.max_length, cfg.train.batch_size,
                                     cfg.seed, teacher_transform=teacher_transform)
    if resume:
        # FSDP builds the train loader before it reads the checkpoint. Damaged files were refused
        # above (checkpoint_damage), so errors here are about the contents, left as they are.
        datamodule.read_checkpoint(last)
    trainer = build_trainer(cfg, output, [*(callbacks or []), _RunEnd(output)])
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None, weights_only=True)
    summary = json.loads((output / SUMMARY).read_text())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning leaves the process group up; a gloo group torn down at interpreter exit can
        # abort the process ("terminate called without an active exception") after a good run.
        torch.distributed.destroy_process_group()
    return summary
