"""LightningDataModule: sources from the config -> resumable, reproducible train/val loaders.

Mid-epoch resume. When Lightning restores a checkpoint taken inside an epoch it does not
skip anything in the dataloader: it builds a fresh iterator (from batch 0) but keeps
counting batches from the checkpoint's ``batch_progress.current`` and ends the epoch at
``len(dataloader)``, so without help the first batches of the epoch are trained on twice
and the last ones never. This module records, in :meth:`state_dict` (stored by Lightning
in every checkpoint), the epoch and the number of batches whose ``training_step`` already
ran, and makes the first train iterator after :meth:`load_state_dict` start right after
them, with the same order and the same augmentations as an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from ..config import DataConfig, KarpathySource, ManifestSource, WebDatasetSource
from ..data.collate import Collator
from ..data.datasets import MixedIterableDataset, PairDataset, Transform, build_train_dataset
from ..data.device_decode import DeviceDecodePlan, DeviceDecoder
from ..data.records import DataError, RecordSet, RetrievalSet, read_source, retrieval_set
from ..data.sampler import ResumableSampler
from ..data.transforms import PixelNormalizer, build_image_transform

log = logging.getLogger(__name__)


class _TrainLoader(DataLoader):
    """A DataLoader that tells its sampler/dataset the epoch right before each iteration.

    Lightning calls ``sampler.set_epoch`` only *after* it has already created the epoch's
    first iterator (and worker processes copy the dataset at that moment), and never on an
    iterable dataset; setting the epoch here covers both. ``resume_at`` sets the epoch and
    the skip of the next iteration once.
    """

    def __init__(self, *args: Any, epoch_fn: Callable[[], int | None], seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_fn = epoch_fn
        self._seed = seed
        self._resume: tuple[int, int] | None = None

    @property
    def _target(self) -> ResumableSampler | MixedIterableDataset:
        return self.dataset if isinstance(self.dataset, MixedIterableDataset) else self.sampler  # type: ignore[return-value]

    def resume_at(self, epoch: int, batches: int) -> None:
        self._resume = (epoch, batches)

    def __iter__(self) -> Iterator[Any]:
        target = self._target
        epoch = self._resume[0] if self._resume is not None else self._epoch_fn()
        if epoch is not None:
            target.set_epoch(epoch)
        if self._resume is not None:
            target.skip(self._resume[1] * self.batch_size)  # type: ignore[operator]
            self._resume = None
        if self.generator is not None:
            # Worker seeds come from this generator, never from the global RNG, which belongs to the
            # model (dropout): a resumed run starts its loader at a point where the uninterrupted run
            # did not, and a draw from the global RNG there would shift every later dropout mask.
            self.generator.manual_seed(self._seed * 65_537 + (epoch or 0))
        iterator = super().__iter__()
        if isinstance(target, MixedIterableDataset):
            target.skip(0)  # the iterator (or its workers' copies) has taken the skip
        return iterator

    # Resume state lives in RetrievalDataModule.state_dict (it needs the trainer's progress
    # counters); these two only tell Lightning that this loader does resume mid-epoch.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


def _source_name(source: KarpathySource | ManifestSource | WebDatasetSource) -> str:
    return source.urls if isinstance(source, WebDatasetSource) else str(source.path)


class RetrievalDataModule(LightningDataModule):
    """Train pairs from all ``cfg.train`` sources (mixed and shuffled), validation pairs from ``cfg.val``.

    Validation: each rank evaluates ``indices[rank::world_size]`` of the validation pairs
    (no padding, no duplicates; ranks differ by at most one pair), in file order. Batches
    carry ``index`` and ``image_id`` so an evaluator can all-gather and regroup them into
    ``self.val_set`` (unique images, captions, caption -> image) for retrieval metrics.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, max_length: int, batch_size: int, seed: int,
                 teacher_transform: Transform | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.teacher_transform = teacher_transform
        host_normalize = not cfg.normalize_on_device
        self.train_transform = build_image_transform(cfg.image_size, cfg.mean, cfg.std, train=True,
                                                     scale=cfg.train_scale, interpolation=cfg.interpolation,
                                                     hflip=cfg.hflip, normalize=host_normalize)
        self.eval_transform = build_image_transform(cfg.image_size, cfg.mean, cfg.std, train=False,
                                                    interpolation=cfg.interpolation, normalize=host_normalize)
        self.normalizer = PixelNormalizer(cfg.mean, cfg.std)
        self.device_decoder: DeviceDecoder | None = None
        if cfg.decode == "device":
            self.train_transform = DeviceDecodePlan(cfg.train_scale, cfg.hflip, host_transform=self.train_transform)
            self.device_decoder = DeviceDecoder(cfg.image_size, cfg.interpolation)
        self.train_sources: list[RecordSet | WebDatasetSource] = []
        self.val_records: RecordSet | None = None
        self.val_set: RetrievalSet | None = None
        self.stats: dict[str, Any] = {}
        self._resume_state: dict[str, Any] | None = None
        self._train_loader: tuple[_TrainLoader, bool] | None = None  # the last one handed out
        self._applied_state: dict[str, Any] | None = None  # the position it was given

    # -----------------------------------------------------------------------------------
    # Reading

    def setup(self, stage: str | None = None) -> None:
        """Read every annotation file once (all ranks read; they are small next to images)."""
        if self.train_sources:
            return
        per_source = []
        for source in self.cfg.train:
            if isinstance(source, WebDatasetSource):
                self.train_sources.append(source)
                per_source.append({"type": "webdataset", "source": source.urls, "pairs": source.size,
                                   "skipped_empty": None})
                continue
            rs = read_source(source)
            self.train_sources.append(rs)
            per_source.append({"type": source.type, "source": rs.source, "pairs": len(rs.records),
                               "skipped_empty": rs.skipped_empty})
        val = self.cfg.val
        if val is not None:
            self.val_records = read_source(val, [self.cfg.val_split])
            self.val_set = retrieval_set(self.val_records.records, self.val_records.skipped_empty)
        self.stats = {
            "train": per_source,
            "train_pairs": sum(s["pairs"] for s in per_source),
            "train_skipped_empty": sum(s["skipped_empty"] or 0 for s in per_source),
            "val": None if self.val_set is None else {
                "source": _source_name(val), "pairs": len(self.val_set.captions),  # type: ignore[arg-type]
                "images": len(self.val_set.images), "skipped_empty": self.val_set.skipped_empty},
        }
        for s in per_source:
            log.info("train source %s (%s): %d pairs, %s empty captions skipped", s["source"], s["type"],
                     s["pairs"], s["skipped_empty"])
        if self.stats["val"]:
            log.info("val source %(source)s: %(pairs)d captions of %(images)d images, "
                     "%(skipped_empty)d empty captions skipped", self.stats["val"])

    # -----------------------------------------------------------------------------------
    # Loaders

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _fit_epoch(self) -> int | None:
        """The epoch Lightning is about to run (the value it passes to ``set_epoch``)."""
        if self.trainer is None:
            return None
        return self.trainer.fit_loop.epoch_progress.current.processed

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.cfg.num_workers
        if workers > 0:
            # the tokenizer runs in forked workers; its Rust thread pool must not be forked
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        on_cuda = (self.trainer.strategy.root_device.type == "cuda" if self.trainer is not None
                   else torch.cuda.is_available())
        # An own generator: a DataLoader without one draws its workers' base seed from the global
        # RNG each time it starts, i.e. it would consume the model's dropout stream.
        return {"batch_size": self.batch_size, "num_workers": workers, "pin_memory": on_cuda,
                "persistent_workers": False, "generator": torch.Generator().manual_seed(self.seed),
                "collate_fn": Collator(self.tokenizer, self.max_length, self.cfg.pad_to_multiple_of)}

    def train_dataloader(self) -> DataLoader:
        """Shuffled, ``drop_last`` batches; rank/world come from the trainer (built with
        ``use_distributed_sampler=False``: splitting is done here)."""
        if not self.train_sources:
            self.setup("fit")
        rank, world = self._rank_world()
        dataset = build_train_dataset(self.train_sources, self.train_transform, self.teacher_transform, self.seed,
                                      rank=rank, world_size=world, batch_size=self.batch_size,
                                      shuffle_buffer=self.cfg.shuffle_buffer, keep_images=self.cfg.cache_images)
        kwargs = self._loader_kwargs()
        if isinstance(dataset, PairDataset):
            sampler = ResumableSampler(len(dataset), shuffle=True, seed=self.seed, rank=rank, world_size=world,
                                       drop_last=True, on_set_epoch=dataset.set_epoch)
            loader = _TrainLoader(dataset, sampler=sampler, drop_last=True, epoch_fn=self._fit_epoch, seed=self.seed,
                                  **kwargs)
        else:
            loader = _TrainLoader(dataset, drop_last=True, epoch_fn=self._fit_epoch, seed=self.seed, **kwargs)
        if len(loader) == 0:
            raise DataError(f"{len(dataset)} training pairs per rank make no full batch of {self.batch_size}")
        self._train_loader = (loader, isinstance(dataset, MixedIterableDataset))
        self._apply_resume(*self._train_loader)
        return loader

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.cfg.val is not None and self.val_records is None:
            self.setup("validate")
        if self.val_records is None:
            return []
        rank, world = self._rank_world()
        dataset = PairDataset(self.val_records.records, self.eval_transform, seed=self.seed)
        return DataLoader(dataset, sampler=list(range(rank, len(dataset), world)), drop_last=False,
                          **self._loader_kwargs())

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Finish on the device: decode JPEGs (``data.decode: device``), then uint8 -> normalised float
        (``data.normalize_on_device``).

        A teacher view of its own (``teacher.view: separate``) is normalised on the host with
        the teacher's statistics and passes through unchanged.
        """
        if isinstance(batch, dict) and "image" in batch:
            if self.device_decoder is not None:
                batch = self.device_decoder(batch, batch["input_ids"].device)
            batch["image"] = self.normalizer(batch["image"])
        return batch

    # -----------------------------------------------------------------------------------
    # Resume

    def _layout(self) -> dict[str, int]:
        """What fixes the batch order besides (seed, epoch): resuming needs the same values."""
        return {"seed": self.seed, "batch_size": self.batch_size, "world_size": self._rank_world()[1],
                "num_workers": self.cfg.num_workers}

    def state_dict(self) -> dict[str, Any]:
        """Position in training: the epoch to resume and how many of its batches already
        ran ``training_step`` (``batch_progress.current.processed``: equal to ``ready`` in
        a checkpoint written at ``on_train_batch_end`` or after validation, and one less
        when written while a step failed - the batch Lightning itself will re-run)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        epochs = trainer.fit_loop.epoch_progress.current
        batches = trainer.fit_loop.epoch_loop.batch_progress.current
        epoch = max(epochs.ready - 1, 0)  # the epoch most recently entered
        consumed = batches.processed if epochs.ready > 0 and epochs.started == epochs.ready else 0
        if consumed >= trainer.num_training_batches:  # that epoch is over: resume at the next one
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "batches_consumed": consumed, **self._layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the position; the next :meth:`train_dataloader` resumes from it."""
        state = dict(state_dict) if state_dict else None
        if self._train_loader is not None:
            # Strategies that restore after setup (FSDP) call this after the train loader was built and
            # its iterator started: too late to position it, hence `read_checkpoint` before fit.
            if state != self._applied_state:
                log.warning("the checkpoint's data position (%s) came after the train loader was built (%s): "
                            "the resumed epoch starts from its first batch", state, self._applied_state)
            return
        self._resume_state = state

    def read_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Take the data position from a Lightning checkpoint now, before fit builds the train loader."""
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        self.load_state_dict(ckpt.get(type(self).__qualname__, {}))

    def _apply_resume(self, loader: _TrainLoader, iterable: bool) -> None:
        state, self._resume_state = self._resume_state, None
        self._applied_state = state
        if state is None:
            return
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        layout = self._layout()
        saved = {k: state.get(k) for k in layout}
        if not iterable:
            saved.pop("num_workers")
            layout.pop("num_workers")  # the map-style order does not depend on workers
        if saved != layout:
            log.warning("resuming epoch %d with a different data layout (%s, checkpoint: %s): batches of the "
                        "resumed epoch will not match the interrupted run", epoch, layout, saved)
            if iterable or saved["seed"] != layout["seed"]:
                consumed = 0  # a different stream: skipping would only drop unseen data
            else:  # same permutation: skip the same global number of samples
                consumed = consumed * saved["batch_size"] * saved["world_size"] // (
                    layout["batch_size"] * layout["world_size"])
        consumed = min(consumed, len(loader))
        log.info("resuming data at epoch %d after %d batches per rank", epoch, consumed)
        loader.resume_at(epoch, consumed)
