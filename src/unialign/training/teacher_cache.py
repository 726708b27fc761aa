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
*evaluation view* of each image: resized to the teacher's size squared (``teacher.image_size``,
by default ``data.image_size``), no crop, no flip
(normalised with ``data.mean/std``, or the teacher's own statistics with
``teacher.view: separate``). Online, the teacher sees the student's augmented pixels
(``teacher.view: same``) or its own augmentation (``separate``). The two agree exactly only
when the online view is un-augmented, e.g. ``data.train_scale: [1, 1]`` and ``data.hflip:
false`` on square images; with the paper's RandomResizedCrop(0.9-1.0) + flip the cache is an
approximation (the target of the whole image rather than of the crop the student sees),
which is why online stays the default.

Building (resumable, and automatic with ``teacher.cache: auto``) is in
:mod:`unialign.training.cache_build`.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, ConfigError
from ..files import file_sha256

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
        "view size": cfg.teacher_image_size,
        "data.interpolation": d.interpolation,
        "view mean": mean,
        "view std": std,
    }
    return json.loads(json.dumps(identity))


def identity_mismatches(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
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
        if str(path) == "auto":
            raise TeacherCacheError("teacher.cache: auto names no folder yet: `unialign train` (training.train) "
                                    "builds or finds it; elsewhere give the cache folder")
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
            wrong = identity_mismatches(meta["identity"], cache_identity(cfg))
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
