"""Cached teacher targets: run the frozen teacher once over the training images, then train without it.

``unialign teacher-cache --config FILE --output CACHE_DIR`` runs the teacher of the config over
every training image and writes, per IMAGE (not per pair: captions of one image share it):

- ``targets.npy``   (N, D) float16 (default) or float32, memory-mappable; row i is the
  L2-normalised target of ``image_ids[i]``
- ``image_ids.npy`` (N,) int64, sorted ascending: ``np.searchsorted`` gives the row
- ``meta.json``     what the targets depend on (teacher name, checkpoint sha256, block,
  after_norm, kwargs; image size, interpolation, mean/std of the teacher's view) plus count,
  dim and dtype, and which decoder made the pixels (``data.decode``: PIL on the host, or the
  device's JPEG decoder with the same resize as training's ``data.decode: device``). Written
  last: a directory without it is not a cache.
- ``bad_samples.tsv`` images that could not be read (training skips them as well)

Training with ``teacher.cache: CACHE_DIR`` checks meta.json against the config (a mismatch is
an error naming the key), never builds the teacher, and looks each batch's targets up by
``image_id`` on the host, in ``on_before_batch_transfer`` (so they reach the device with the
batch, and a missing id is an exact error with no device sync).

**When cached targets equal online ones.** The cache holds the teacher's output for the
*evaluation view* of each image: resized to ``data.image_size`` squared, no crop, no flip
(normalised with ``data.mean/std``, or the teacher's own statistics with
``teacher.view: separate``). Online, the teacher sees the student's augmented pixels
(``teacher.view: same``) or its own augmentation (``separate``). The two agree exactly only
when the online view is un-augmented, e.g. ``data.train_scale: [1, 1]`` and ``data.hflip:
false`` on square images; with the paper's RandomResizedCrop(0.9-1.0) + flip the cache is an
approximation (the target of the whole image rather than of the crop the student sees),
which is why online stays the default.

Building is resumable: work is cut into units (a chunk of images of a map-style source, or
one shard of a webdataset source), each written atomically to ``CACHE_DIR/.parts/``; a rerun
skips finished units, then the parts are assembled into the final files (each renamed into
place) and ``.parts`` is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import Config, ConfigError, KarpathySource, WebDatasetSource
from ..files import atomic_path, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "unialign-teacher-cache"
VERSION = 1
TARGETS = "targets.npy"
IDS = "image_ids.npy"
META = "meta.json"
BAD = "bad_samples.tsv"
PARTS = ".parts"


class TeacherCacheError(ConfigError):
    """A teacher cache that is missing, incomplete, built for another teacher/view, or lacks an image."""


# ---------------------------------------------------------------------------------------
# What the targets depend on


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file (memoised per path, size and mtime: checkpoints are hundreds of MB)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def teacher_view_stats(cfg: Config) -> tuple[list[float], list[float]]:
    """Normalisation of the pixels the teacher sees online: the student's (``view: same``) or
    the teacher model's own statistics (``view: separate``, as ``Teacher.train_transform``)."""
    d, t = cfg.data, cfg.teacher
    if t.view == "same" or t.backend != "timm":
        return list(d.mean), list(d.std)
    import timm

    with torch.device("meta"):  # the statistics only: no weights are allocated or loaded
        model = timm.create_model(t.name, pretrained=False, num_classes=0, **t.kwargs)
    stats = timm.data.resolve_data_config({}, model=model)
    return list(stats.get("mean", d.mean)), list(stats.get("std", d.std))


def cache_identity(cfg: Config) -> dict[str, Any]:
    """Everything a target depends on, keyed like the config (JSON-normalised for comparison)."""
    t, d = cfg.teacher, cfg.data
    mean, std = teacher_view_stats(cfg)
    identity = {
        "teacher.backend": t.backend,
        "teacher.name": t.name,
        "teacher.pretrained": t.pretrained,
        "teacher.checkpoint (sha256)": file_sha256(t.checkpoint) if t.checkpoint is not None else None,
        "teacher.block": t.block,
        "teacher.after_norm": t.after_norm,
        "teacher.kwargs": t.kwargs,
        "data.image_size": d.image_size,
        "data.interpolation": d.interpolation,
        "view mean": mean,
        "view std": std,
    }
    return json.loads(json.dumps(identity))


def _mismatches(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [f"{key}: cache has {found.get(key)!r}, config gives {expected[key]!r}"
            for key in expected if found.get(key) != expected[key]]


# ---------------------------------------------------------------------------------------
# Reading a cache (training)


class TeacherCache:
    """A finished cache, memory-mapped; ``lookup(image_ids)`` gives float32 targets on the host."""

    def __init__(self, path: Path, meta: dict[str, Any], ids: np.ndarray, targets: np.ndarray) -> None:
        self.path = Path(path)
        self.meta = meta
        self.ids = ids
        self.targets = targets
        self.dim = int(targets.shape[1])
        bad = self.path / BAD
        # Images that could not be read when the cache was built: training skips them too.
        self.unreadable = {line.split("\t", 1)[0] for line in bad.read_text().splitlines()} if bad.is_file() else set()

    @classmethod
    def open(cls, path: str | Path, cfg: Config | None = None, warm: bool = True) -> TeacherCache:
        """Open ``path``; with ``cfg``, fail unless it was built for that config's teacher and view."""
        path = Path(path)
        meta_file = path / META
        if not meta_file.is_file():
            partial = " (an unfinished build: rerun `unialign teacher-cache` to complete it)" \
                if (path / PARTS).is_dir() else ""
            raise TeacherCacheError(f"teacher.cache {path} is not a teacher cache: {meta_file} is missing{partial}")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise TeacherCacheError(f"teacher.cache {path}: unknown format {meta.get('format')!r} "
                                    f"version {meta.get('version')!r} (expected {FORMAT!r} {VERSION})")
        if cfg is not None:
            wrong = _mismatches(meta["identity"], cache_identity(cfg))
            if wrong:
                raise TeacherCacheError(f"teacher.cache {path} was built for another teacher or view; rebuild it "
                                        "with `unialign teacher-cache` for this config, or fix the config:\n  "
                                        + "\n  ".join(wrong))
        ids = np.load(path / IDS)
        targets = np.load(path / TARGETS, mmap_mode="r")
        if ids.dtype != np.int64 or ids.ndim != 1 or targets.ndim != 2 or len(ids) != len(targets) \
                or len(ids) != meta["count"]:
            raise TeacherCacheError(f"teacher.cache {path}: {IDS} {ids.shape}/{ids.dtype} and {TARGETS} "
                                    f"{targets.shape} do not match meta.json count {meta['count']}")
        cache = cls(path, meta, ids, targets)
        if warm:
            cache.prefetch()
        return cache

    def prefetch(self) -> None:
        """Ask the kernel to read the targets into the page cache in the background (shared by
        every process on the machine), so the first epoch's random lookups do not hit the disk."""
        mm = getattr(self.targets, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            try:
                mm.madvise(mmap.MADV_WILLNEED)
            except (OSError, ValueError):
                pass

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict[str, Any]:  # spawned workers reopen the files, never pickle GBs
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = TeacherCache.open(state["path"], warm=False)
        self.__dict__.update(other.__dict__)

    def missing(self, image_ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the ids that have no row."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        if len(self.ids) == 0:
            return np.ones(image_ids.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(self.ids, image_ids), len(self.ids) - 1)
        return self.ids[pos] != image_ids

    def rows(self, image_ids: np.ndarray) -> np.ndarray:
        image_ids = np.asarray(image_ids, dtype=np.int64)
        absent = self.missing(image_ids)
        if absent.any():
            first = int(image_ids[absent][0])
            n = len(np.unique(image_ids[absent]))
            raise TeacherCacheError(
                f"image id {first} is not in the teacher cache {self.path} ({n} id(s) of this batch missing); "
                "the cache was built from other data: rebuild it with `unialign teacher-cache` for this config")
        return np.searchsorted(self.ids, image_ids)

    def lookup(self, image_ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``(B,)`` ids -> ``(B, D)`` float32 targets (CPU); an unknown id is an error naming it."""
        if isinstance(image_ids, torch.Tensor):
            image_ids = image_ids.detach().cpu().numpy()
        rows = self.rows(image_ids)
        return torch.from_numpy(np.asarray(self.targets[rows], dtype=np.float32))

    def check_records(self, records: Sequence[Any], source: str) -> None:
        """Fail before training when images of a map-style source are not cached."""
        if not records:
            return
        ids = np.fromiter((r.image_id for r in records), dtype=np.int64, count=len(records))
        absent = self.missing(ids)
        if absent.any() and self.unreadable:
            absent &= np.array([r.image not in self.unreadable for r in records])
        if absent.any():
            i = int(np.flatnonzero(absent)[0])
            n = len(np.unique(ids[absent]))
            raise TeacherCacheError(
                f"image id {int(ids[i])} ({records[i].image}) of training source {source} is not in the teacher "
                f"cache {self.path} ({n} image(s) of that source missing); rebuild it with `unialign teacher-cache` "
                "for this config")


# ---------------------------------------------------------------------------------------
# Building a cache


@dataclass(frozen=True)
class _Unit:
    """A resumable piece of work: images of a map-style source, or one shard."""

    key: str
    size: int  # images expected (for the progress bar)
    items: tuple[tuple[str, int], ...] = ()  # (image path, image id) for map-style sources
    url: str | None = None
    source: WebDatasetSource | None = None


def _plan(cfg: Config, chunk_size: int) -> list[_Unit]:
    """Deterministic units over every training source (map-style images deduplicated by id)."""
    from ..data.records import read_source

    units: list[_Unit] = []
    for s, source in enumerate(cfg.data.train):
        if isinstance(source, WebDatasetSource):
            import webdataset as wds

            urls = wds.shardlists.expand_urls(source.urls)
            per_shard = max(1, source.size // max(1, len(urls)))
            units += [_Unit(f"s{s:02d}-shard{u:06d}", per_shard, url=url, source=source) for u, url in enumerate(urls)]
            continue
        rs = read_source(source)
        seen: dict[int, str] = {}
        for rec in rs.records:
            seen.setdefault(rec.image_id, rec.image)
        images = [(path, image_id) for image_id, path in seen.items()]
        for u, start in enumerate(range(0, len(images), chunk_size)):
            chunk = tuple(images[start:start + chunk_size])
            units.append(_Unit(f"s{s:02d}-chunk{u:06d}", len(chunk), items=chunk))
    return units


class _UnitImages(IterableDataset):
    """Eval-view images of the given units, batched inside each unit; units are dealt
    round-robin to DataLoader workers. Every unit ends with one item flagged ``last``.

    ``prepare(image, name)`` gives ``{"image": uint8 tensor}`` (decoded here) or, with
    ``data.decode: device``, a planned JPEG that the main process decodes on the device; the
    batches have the training batches' layout (``collate_planned``) so the same
    ``DeviceDecoder`` finishes them.
    """

    def __init__(self, units: Sequence[_Unit], prepare: Callable[[str | bytes, str], dict[str, Any]],
                 batch_size: int) -> None:
        self.units = list(units)
        self.prepare = prepare
        self.batch_size = batch_size

    def _samples(self, unit: _Unit) -> Iterator[tuple[str | bytes, str, int] | tuple[str, str]]:
        """(image, name, image id), or (name, reason) for a sample that cannot be used."""
        if unit.url is None:
            for path, image_id in unit.items:
                yield path, path, image_id
            return
        from ..data.datasets import ShardStream

        stream = ShardStream(unit.source, shuffle_buffer=0)  # type: ignore[arg-type]
        seen: set[int] = set()
        for item in stream._read(iter([unit.url])):
            pending = stream.pending(item)
            if isinstance(pending, dict):
                yield pending["bad"], pending["reason"]
                continue
            image, name, _, image_id = pending  # the same image id as training computes
            if image_id not in seen:
                seen.add(image_id)
                yield image, name, image_id

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from ..data.images import ImageLoadError

        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for unit in self.units[worker::n_workers]:
            samples: list[dict[str, Any]] = []
            ids: list[int] = []
            bad: list[tuple[str, str]] = []
            for sample in self._samples(unit):
                if len(sample) == 2:
                    bad.append(sample)  # type: ignore[arg-type]
                    continue
                image, name, image_id = sample  # type: ignore[misc]
                try:
                    samples.append(self.prepare(image, name))
                    ids.append(image_id)
                except ImageLoadError as err:
                    bad.append((name, str(err)))
                if len(samples) == self.batch_size:
                    yield self._batch(unit, samples, ids, bad, last=False)
                    samples, ids, bad = [], [], []
            yield self._batch(unit, samples, ids, bad, last=True)

    @staticmethod
    def _batch(unit: _Unit, samples: list[dict[str, Any]], ids: list[int], bad: list[tuple[str, str]],
               last: bool) -> dict[str, Any]:
        from ..data.device_decode import collate_planned

        return {**collate_planned(samples), "size": len(samples), "ids": torch.tensor(ids, dtype=torch.int64),
                "unit": unit.key, "skipped": bad, "last": last}


def _decode_on_host(transform: Callable[[Any], torch.Tensor], image: str | bytes, name: str) -> dict[str, Any]:
    from ..data.images import load_image

    return {"image": transform(load_image(image, name=name))}


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


_DTYPES = {"float16": np.float16, "float32": np.float32}
_AUTOCAST = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def build_teacher_cache(cfg: Config, output: str | Path, *, batch_size: int = 256, num_workers: int | None = None,
                        device: str | None = None, dtype: str = "float16", precision: str | None = None,
                        chunk_size: int = 4096, overwrite: bool = False, progress: bool = True,
                        max_units: int | None = None) -> Path:
    """Run the config's teacher over the eval view of every training image; returns ``output``.

    ``precision`` is the teacher's autocast ("32", "bf16", "16"; default bf16 on CUDA, 32
    otherwise). ``max_units`` stops after that many units (simulates an interruption; tests).
    """
    from ..data.device_decode import DeviceDecodePlan, DeviceDecoder
    from ..data.transforms import PixelNormalizer, build_image_transform
    from ..model.teacher import Teacher

    if not cfg.teacher.enabled:
        raise TeacherCacheError("teacher.enabled is false: there is no teacher to cache")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = precision or ("bf16" if torch.device(device).type == "cuda" else "32")
    if precision not in _AUTOCAST:
        raise ValueError(f"precision must be one of {sorted(_AUTOCAST)}, got {precision!r}")
    output = Path(output)
    identity = cache_identity(cfg)
    meta_file = output / META
    if meta_file.is_file():
        existing = json.loads(meta_file.read_text())
        wrong = _mismatches(existing.get("identity", {}), identity)
        if not wrong and not overwrite:
            log.info("teacher cache %s is complete (%d images)", output, existing["count"])
            return output
        if wrong and not overwrite:
            raise TeacherCacheError(f"{output} holds a teacher cache for another teacher or view "
                                    "(pass --overwrite to replace it):\n  " + "\n  ".join(wrong))
        for name in (META, TARGETS, IDS, BAD):
            (output / name).unlink(missing_ok=True)
    parts = output / PARTS
    if overwrite and parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)

    units = _plan(cfg, chunk_size)
    # What each unit holds (shard URL, or a digest of its images): parts of another plan never mix.
    plan = {"identity": identity, "dtype": dtype, "chunk_size": chunk_size, "decode": cfg.data.decode,
            "units": [[u.key, u.url or hashlib.blake2b(repr(u.items).encode(), digest_size=8).hexdigest()]
                      for u in units]}
    plan_file = parts / "plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old != json.loads(json.dumps(plan)):
            raise TeacherCacheError(f"{parts} holds an unfinished build for another teacher, view, dtype, decoder "
                                    "or data (pass --overwrite to start over)")
    else:
        write_json_atomic(plan_file, plan)
    done = {u.key for u in units if (parts / f"{u.key}.npz").is_file()}
    todo = [u for u in units if u.key not in done]
    if max_units is not None:
        todo = todo[:max_units]
    if done:
        log.info("resuming teacher cache %s: %d of %d units done", output, len(done), len(units))

    if todo:
        teacher = Teacher(cfg.teacher).to(device)
        d = cfg.data
        mean, std = identity["view mean"], identity["view std"]
        # uint8 out of the workers, normalised on the device (bit-identical to the online view)
        transform = build_image_transform(d.image_size, mean, std, train=False, interpolation=d.interpolation,
                                          normalize=False)
        normalizer = PixelNormalizer(mean, std)
        decoder = DeviceDecoder(d.image_size, d.interpolation) if d.decode == "device" else None
        prepare = (DeviceDecodePlan(None, False, host_transform=transform) if decoder is not None
                   else partial(_decode_on_host, transform))
        workers = d.num_workers if num_workers is None else num_workers
        on_cuda = torch.device(device).type == "cuda"
        loader = DataLoader(_UnitImages(todo, prepare, batch_size), batch_size=None, num_workers=workers,
                            pin_memory=on_cuda)
        autocast = _AUTOCAST[precision]
        from tqdm import tqdm

        bar = tqdm(total=sum(u.size for u in units), initial=sum(u.size for u in units if u.key in done),
                   unit="img", desc="teacher cache", disable=not progress, dynamic_ncols=True)
        pending: dict[str, dict[str, list[Any]]] = {}
        for batch in loader:
            state = pending.setdefault(batch["unit"], {"ids": [], "targets": [], "bad": []})
            batch["image"] = batch["image"].to(device, non_blocking=True)
            if decoder is not None:
                batch = decoder(batch, torch.device(device))  # drops (and lists) JPEGs nothing can decode
            if batch["size"]:
                ctx = torch.autocast(torch.device(device).type, dtype=autocast) if autocast else nullcontext()
                with ctx:
                    targets = teacher(normalizer(batch["image"]))
                state["targets"].append(targets.float().cpu().numpy().astype(_DTYPES[dtype]))
                state["ids"].append(batch["ids"].numpy())
            state["bad"] += batch["skipped"]
            bar.update(batch["size"] + len(batch["skipped"]))
            if batch["last"]:
                state = pending.pop(batch["unit"])
                dim = teacher.width
                _save_npz_atomic(
                    parts / f"{batch['unit']}.npz",
                    ids=np.concatenate(state["ids"]) if state["ids"] else np.zeros(0, np.int64),
                    targets=np.concatenate(state["targets"]) if state["targets"] else np.zeros((0, dim),
                                                                                            _DTYPES[dtype]),
                    bad=np.array(["\t".join(" ".join(str(x).split()) for x in b) for b in state["bad"]], dtype=str))
        bar.close()
    missing_units = [u.key for u in units if not (parts / f"{u.key}.npz").is_file()]
    if missing_units:
        log.info("teacher cache %s: %d unit(s) left; rerun to continue", output, len(missing_units))
        return output
    _assemble(output, units, identity, dtype, precision, cfg.data.decode)
    return output


def _assemble(output: Path, units: Sequence[_Unit], identity: dict[str, Any], dtype: str, precision: str,
              decode: str) -> None:
    """Parts -> sorted, deduplicated final files; meta.json last, then the parts are removed."""
    from numpy.lib.format import open_memmap

    parts = output / PARTS
    files = [parts / f"{u.key}.npz" for u in units]
    id_lists = []
    dim = None
    bad: list[str] = []
    for f in files:
        with np.load(f) as z:
            id_lists.append(z["ids"])
            bad += [str(b) for b in z["bad"]]
            dim = z["targets"].shape[1] if dim is None else dim
    all_ids = np.concatenate(id_lists) if id_lists else np.zeros(0, np.int64)
    ids, first = np.unique(all_ids, return_index=True)  # sorted; the first occurrence of each id wins
    dest = np.full(len(all_ids), -1, dtype=np.int64)
    dest[first] = np.arange(len(ids))
    with atomic_path(output / TARGETS) as tmp_targets:
        out = open_memmap(tmp_targets, mode="w+", dtype=_DTYPES[dtype], shape=(len(ids), dim or 0))
        offset = 0
        for f, n in zip(files, (len(x) for x in id_lists), strict=True):
            rows = dest[offset:offset + n]
            keep = rows >= 0
            if keep.any():
                with np.load(f) as z:
                    out[rows[keep]] = z["targets"][keep]
            offset += n
        out.flush()
        del out
    with atomic_path(output / IDS) as tmp_ids, open(tmp_ids, "wb") as fh:
        np.save(fh, ids.astype(np.int64))
    write_text_atomic(output / BAD, "".join(line + "\n" for line in bad))
    duplicates = len(all_ids) - len(ids)
    meta = {"format": FORMAT, "version": VERSION, "identity": identity, "count": len(ids), "dim": int(dim or 0),
            "dtype": dtype, "teacher_precision": precision, "view": "eval (resize to image_size, no crop, no flip)",
            "decode": decode,
            "skipped_unreadable": len(bad), "duplicate_ids_dropped": int(duplicates)}
    write_json_atomic(output / META, meta)
    shutil.rmtree(parts)
    log.info("teacher cache %s: %d images x %d (%s), %d unreadable skipped, %d duplicate ids", output, len(ids),
             dim or 0, dtype, len(bad), duplicates)


# ---------------------------------------------------------------------------------------
# Command line
