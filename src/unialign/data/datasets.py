"""Datasets of (augmented image, caption, image id) samples.

Bad data never raises: a missing/corrupt image, or a shard sample without image or
caption, becomes a marker ``{"bad": name, "reason": ...}`` that the collator drops and
counts, so one broken file among millions cannot kill a multi-day run while the training
code can still enforce ``data.max_bad_fraction``.

Augmentation is reproducible: each sample's random crop/flip is drawn from a torch RNG
seeded by (seed, epoch, position), inside :func:`torch.random.fork_rng`, so it does not
depend on the number of DataLoader workers, on what else consumed randomness, or on
whether the run was resumed.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from unialign.config import WebDatasetSource
from unialign.data.device_decode import DeviceDecodePlan
from unialign.data.images import ImageLoadError, load_image
from unialign.data.records import DataError, Record, RecordSet, namespaced_id, stable_id
from unialign.data.sampler import derive_seed

log = logging.getLogger(__name__)


def webdataset() -> Any:
    """The `webdataset` package, imported where shards are read or written: it comes with the
    `train` extra, and the rest of the data pipeline works without it."""
    try:
        import webdataset as wds
    except ImportError:
        raise ImportError("webdataset shards need the webdataset package: pip install unialign[train]") from None
    return wds


# PIL image -> tensor, or (data.decode: device) a plan that leaves JPEG decoding to the device
Transform = Callable[[Any], torch.Tensor] | DeviceDecodePlan
Sample = dict[str, Any]
# What a stream hands to decoding: (image path or bytes, name for messages, caption, image id),
# or an already-built bad marker.
Pending = tuple[str | bytes, str, str, int] | Sample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def bad_marker(name: str, reason: str) -> Sample:
    return {"bad": name, "reason": reason}


def is_bad(item: Sample) -> bool:
    return "bad" in item


def make_sample(image: str | bytes, name: str, caption: str, image_id: int, transform: Transform,
                teacher_transform: Transform | None, seed: int) -> Sample:
    """Decode and augment one pair with a private RNG seeded by ``seed``.

    The teacher transform runs after the student's on the same RNG stream, so it draws
    its own (equally reproducible) augmentation of the same decoded image.
    """
    if isinstance(transform, DeviceDecodePlan):  # data.decode: device (no separate teacher view)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                planned = transform(image, name)
        except ImageLoadError as err:
            return bad_marker(name, str(err))
        return {**planned, "caption": caption, "image_id": image_id}
    try:
        img = load_image(image, name=name)
    except ImageLoadError as err:
        return bad_marker(name, str(err))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sample: Sample = {"image": transform(img), "caption": caption, "image_id": image_id}
        if teacher_transform is not None:
            sample["teacher_image"] = teacher_transform(img)
    return sample


class PairDataset(Dataset):
    """Map-style dataset over records; sample ``i`` of epoch ``e`` is always augmented the same way.

    DataLoader workers hold copies of this object, so :meth:`set_epoch` must be called
    in the main process *before* the epoch's iterator is created (with
    ``persistent_workers=False`` the copies are made then). :class:`ResumableSampler`
    does that through its ``on_set_epoch`` hook.
    """

    def __init__(self, records: Sequence[Record], transform: Transform,
                 teacher_transform: Transform | None = None, seed: int = 0, keep_images: bool = False) -> None:
        self.records = records
        self.transform = transform
        self.teacher_transform = teacher_transform
        self.seed = seed
        self.epoch = 0
        # data.cache_images: an un-augmented view is the same at every epoch, so each image is
        # decoded and transformed once (per loading process: worker processes start afresh each epoch)
        self.kept: dict[str, torch.Tensor] | None = {} if keep_images else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        image = None if self.kept is None or not isinstance(rec.image, str) else self.kept.get(rec.image)
        if image is not None:
            sample: Sample = {"image": image, "caption": rec.caption, "image_id": rec.image_id}
        else:
            sample = make_sample(rec.image, rec.image, rec.caption, rec.image_id, self.transform,
                                 self.teacher_transform, derive_seed(self.seed, self.epoch, index))
            if self.kept is not None and isinstance(rec.image, str) and isinstance(sample.get("image"), torch.Tensor):
                self.kept[rec.image] = sample["image"]
        if not is_bad(sample):
            sample["index"] = index  # lets distributed evaluation restore the original order
        return sample


# ---------------------------------------------------------------------------------------
# Iterable streams (webdataset shards, and map-style sources when mixed with shards)


class PairStream(Protocol):
    """An endless, per-consumer stream of undecoded items from one source."""

    size: int
    name: str

    def items(self, seed: int, consumer: int, n_consumers: int) -> Iterator[Any]: ...

    def pending(self, item: Any) -> Pending: ...


def _endless_share(seed: int, consumer: int, n_consumers: int,
                   order: Callable[[random.Random], list[Any]]) -> Iterator[Any]:
    """Every ``n_consumers``-th element, from ``consumer`` on, of endless reshuffled passes.

    All consumers see the same sequence of passes, so within a pass they read disjoint
    parts; taking from the endless concatenation means a consumer is never left empty,
    even with fewer shards than ranks x workers.
    """
    passes = (order(random.Random(derive_seed(seed, p))) for p in itertools.count())
    return itertools.islice(itertools.chain.from_iterable(passes), consumer, None, n_consumers)


class RecordStream:
    """A map-style source as an endless stream: a fresh permutation per pass."""

    def __init__(self, records: Sequence[Record], name: str) -> None:
        if not records:
            raise DataError(f"{name}: no records")
        self.records = records
        self.size = len(records)
        self.name = name

    def _order(self, rng: random.Random) -> list[int]:
        order = list(range(self.size))
        rng.shuffle(order)
        return order

    def items(self, seed: int, consumer: int, n_consumers: int) -> Iterator[Record]:
        return (self.records[i] for i in _endless_share(seed, consumer, n_consumers, self._order))

    def pending(self, item: Record) -> Pending:
        return item.image, item.image, item.caption, item.image_id


class ShardStream:
    """Webdataset tar shards as an endless stream: shard order reshuffled per pass, shards
    split across (rank, worker) consumers, samples shuffled in a seeded buffer.

    A shard that cannot be read yields one bad marker (and the next shard is read), so it
    shows up in the skip counts instead of crashing the run.
    """

    def __init__(self, source: WebDatasetSource, shuffle_buffer: int = 1000) -> None:
        self.urls = webdataset().shardlists.expand_urls(source.urls)
        if not self.urls:
            raise DataError(f"webdataset urls {source.urls!r}: expands to no shards")
        self.size = source.size
        self.name = source.urls
        self.caption_key = source.caption_key
        self.namespace = source.namespace()
        self.shuffle_buffer = shuffle_buffer

    def _order(self, rng: random.Random) -> list[str]:
        urls = list(self.urls)
        rng.shuffle(urls)
        return urls

    def _read(self, urls: Iterator[str]) -> Iterator[dict[str, Any]]:
        empty_run = 0
        for url in urls:
            n = 0
            try:
                for sample in webdataset().tarfile_samples(iter([{"url": url}])):
                    n += 1
                    yield sample
            except Exception as err:  # any reader failure is a bad shard, reported as data
                log.warning("unreadable shard %s: %s", url, err)
                n += 1
                yield {"__bad__": url, "reason": f"unreadable shard ({type(err).__name__}: {err})"}
            empty_run = 0 if n else empty_run + 1
            if empty_run > len(self.urls):
                raise DataError(f"webdataset {self.name!r}: shards contain no samples")

    def items(self, seed: int, consumer: int, n_consumers: int) -> Iterator[dict[str, Any]]:
        samples = self._read(_endless_share(seed, consumer, n_consumers, self._order))
        if self.shuffle_buffer <= 1:
            return samples
        return webdataset().shuffle(self.shuffle_buffer, self.shuffle_buffer,
                           seed=derive_seed(seed, consumer, n_consumers))(samples)

    def pending(self, item: dict[str, Any]) -> Pending:
        if "__bad__" in item:
            return bad_marker(item["__bad__"], item["reason"])
        name = f"{item.get('__url__', '?')}#{item['__key__']}"
        image = next((item[ext] for ext in IMAGE_EXTENSIONS if ext in item), None)
        if image is None:
            return bad_marker(name, f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        meta: Any = {}
        if "json" in item:
            try:
                meta = json.loads(item["json"])
            except (ValueError, UnicodeDecodeError) as err:
                return bad_marker(name, f"invalid .json member ({err})")
        if "txt" in item:
            caption: Any = item["txt"].decode("utf-8", errors="replace")
        else:
            caption = meta.get(self.caption_key) if isinstance(meta, dict) else None
        caption = " ".join(caption.split()) if isinstance(caption, str) else ""
        if not caption:
            return bad_marker(name, "no caption")
        raw_id = meta.get("image_id") if isinstance(meta, dict) else None
        image_id = (namespaced_id(self.namespace, raw_id) if isinstance(raw_id, int) and not isinstance(raw_id, bool)
                    else stable_id(name))
        return image, name, caption, image_id


@dataclass(eq=False)
class MixedIterableDataset(IterableDataset):
    """Several streams randomly interleaved (weights default to source sizes), cut into a
    fixed-length epoch of ``sum(sizes) // (world_size * batch_size)`` batches per rank.

    Streams are split by (rank, worker). Everything random — shard order, shuffle buffer,
    source choice, augmentation — is seeded by (seed, epoch, rank, worker, position), so
    an epoch replays identically for the same world size, batch size and worker count,
    which is what :meth:`skip` relies on to resume mid-epoch.
    """

    streams: Sequence[PairStream]
    transform: Transform
    teacher_transform: Transform | None = None
    _: KW_ONLY
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    batch_size: int = 1
    weights: Sequence[float] | None = None
    epoch: int = field(default=0, init=False)
    _skip_batches: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.streams:
            raise ValueError("need at least one stream")
        self.streams = list(self.streams)
        self.weights = list(self.weights) if self.weights is not None else [float(s.size) for s in self.streams]
        total = sum(s.size for s in self.streams)
        self.batches_per_epoch = total // (self.world_size * self.batch_size)
        if self.batches_per_epoch < 1:
            raise DataError(f"{total} pairs make no full batch of {self.batch_size} on each of "
                            f"{self.world_size} rank(s)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, n_samples: int) -> None:
        """Make the next iteration start after this rank's first ``n_samples`` samples (once)."""
        if n_samples % self.batch_size or not 0 <= n_samples <= len(self):
            raise ValueError(f"can skip a multiple of {self.batch_size} in 0..{len(self)} samples, got {n_samples}")
        self._skip_batches = n_samples // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[Sample]:
        # Not a generator: the epoch and skip are captured now, in the process that calls
        # iter(), so the main process can reset its copy right after creating workers.
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        skipped, self._skip_batches = self._skip_batches, 0
        # Global batch b comes from logical worker b % n_workers. A resumed DataLoader asks
        # worker 0 first, so worker w plays logical worker (w + skipped) % n_workers.
        logical = (worker + skipped) % n_workers
        n_batches = len(range(logical, self.batches_per_epoch, n_workers))
        n_skip = len(range(logical, skipped, n_workers))
        consumer = self.rank * n_workers + logical
        return self._generate(self.epoch, consumer, self.world_size * n_workers,
                              n_batches * self.batch_size, n_skip * self.batch_size)

    def _generate(self, epoch: int, consumer: int, n_consumers: int, n_samples: int,
                  n_skip: int) -> Iterator[Sample]:
        items = [s.items(derive_seed(self.seed, epoch, i), consumer, n_consumers)
                 for i, s in enumerate(self.streams)]
        chooser = random.Random(derive_seed(self.seed, epoch, consumer, n_consumers))
        choices = range(len(items))
        for position in range(n_samples):
            k = chooser.choices(choices, weights=self.weights)[0] if len(items) > 1 else 0
            item = next(items[k])
            if position < n_skip:
                continue  # already trained on; skipped before the costly decode
            pending = self.streams[k].pending(item)
            if isinstance(pending, dict):
                yield pending
                continue
            image, name, caption, image_id = pending
            yield make_sample(image, name, caption, image_id, self.transform, self.teacher_transform,
                              derive_seed(self.seed, epoch, consumer, n_consumers, position))


def build_train_dataset(sources: Sequence[RecordSet | WebDatasetSource], transform: Transform,
                        teacher_transform: Transform | None = None, seed: int = 0, *, rank: int = 0,
                        world_size: int = 1, batch_size: int = 1,
                        shuffle_buffer: int = 1000, keep_images: bool = False) -> PairDataset | MixedIterableDataset:
    """Map-style when every source is (one PairDataset over all records, shuffled by a
    sampler); otherwise every source becomes a stream and they are randomly mixed."""
    if all(isinstance(s, RecordSet) for s in sources):
        records = [r for s in sources for r in s.records]  # type: ignore[union-attr]
        return PairDataset(records, transform, teacher_transform, seed, keep_images)
    streams: list[PairStream] = [
        ShardStream(s, shuffle_buffer) if isinstance(s, WebDatasetSource) else RecordStream(s.records, s.source)
        for s in sources]
    return MixedIterableDataset(streams, transform, teacher_transform, seed=seed, rank=rank,
                                world_size=world_size, batch_size=batch_size)
