"""Building a teacher cache: the frozen teacher run once over every training image.

Work is cut into units (a chunk of images of a map-style source, or one shard of a webdataset
source), each written atomically to ``CACHE_DIR/.parts/``; a rerun skips finished units, then
the parts are assembled into the final files (each renamed into place) and ``.parts`` is
removed. The format and the reader are in :mod:`unialign.training.teacher_cache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import Config, WebDatasetSource
from ..files import atomic_path, write_json_atomic, write_text_atomic
from ..model.towers import frozen_count, prefix_tensors
from .prefix_cache import FrozenPrefixCache, image_prefix_inputs, shared_prefix_cache
from .teacher_cache import (BAD, FORMAT, IDS, META, PARTS, TARGETS, VERSION, TeacherCacheError, cache_identity,
                            identity_mismatches, teacher_view_stats)

log = logging.getLogger(__name__)


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


def _unit_digests(units: Sequence[_Unit]) -> list[list[str]]:
    """What each unit holds (shard URL, or a digest of its images and ids)."""
    return [[u.key, u.url or hashlib.blake2b(repr(u.items).encode(), digest_size=8).hexdigest()] for u in units]


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


_TRAIN_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}  # the same autocast


def _student_prefix(cfg: Config, teacher: Any, precision: str) -> FrozenPrefixCache | None:
    """Within `shared_prefix_caches`, the cache of the student's frozen image blocks
    (train.cache_frozen_image), when the teacher's first blocks are those (same weights) and it sees
    the student's pixels at the student's precision: the teacher's pass fills it on the way, so the
    student's first epoch computes nothing there. None otherwise."""
    d, image = cfg.data, cfg.model.image
    kept = image.layers if isinstance(image.layers, int) else len(image.layers)
    n = frozen_count(image.freeze_layers, kept)
    backbone = teacher.backbone
    mean, std = teacher_view_stats(cfg)
    same_view = cfg.teacher_image_size == d.image_size and (tuple(mean), tuple(std)) == (d.mean, d.std)
    if not (cfg.train.cache_frozen_image and same_view and 0 < n <= backbone.num_blocks
            and _TRAIN_PRECISION[precision] == cfg.train.precision and not backbone.split_error()):
        return None
    return shared_prefix_cache(n, None, prefix_tensors(backbone, backbone.num_blocks, n), image_prefix_inputs(cfg))


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
        wrong = identity_mismatches(existing.get("identity", {}), identity)
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
            "units": _unit_digests(units)}
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
        prefix = _student_prefix(cfg, teacher, precision)
        d = cfg.data
        mean, std = identity["view mean"], identity["view std"]
        # uint8 out of the workers, normalised on the device (bit-identical to the online view)
        size = cfg.teacher_image_size
        transform = build_image_transform(size, mean, std, train=False, interpolation=d.interpolation,
                                          normalize=False)
        normalizer = PixelNormalizer(mean, std)
        decoder = DeviceDecoder(size, d.interpolation) if d.decode == "device" else None
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
                    pixels = normalizer(batch["image"])
                    if prefix is None:
                        targets = teacher(pixels)
                    else:
                        rows, fill = (t.to(device) for t in prefix.plan(batch["ids"].tolist()))
                        tokens = prefix.read(lambda i: teacher.backbone.forward_prefix(pixels[i], prefix.n_blocks),
                                             rows, fill)
                        targets = teacher.forward_from(tokens, prefix.n_blocks)
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
            "dtype": dtype, "teacher_precision": precision, "view": "eval (resize to the view size, no crop, no flip)",
            "decode": decode,
            "skipped_unreadable": len(bad), "duplicate_ids_dropped": int(duplicates)}
    write_json_atomic(output / META, meta)
    shutil.rmtree(parts)
    log.info("teacher cache %s: %d images x %d (%s), %d unreadable skipped, %d duplicate ids", output, len(ids),
             dim or 0, dtype, len(bad), duplicates)


# ---------------------------------------------------------------------------------------
# teacher.cache: auto


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/unialign/teacher-cache`` (default ``~/.cache/unialign/teacher-cache``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "unialign" / "teacher-cache"


def auto_cache_dir(cfg: Config, root: str | Path | None = None, chunk_size: int = 4096) -> Path:
    """The folder ``teacher.cache: auto`` uses: one per teacher, view, decoder and set of training
    images (paths and ids), so a changed manifest gets a cache of its own instead of failing."""
    units = _plan(cfg, chunk_size)
    key = json.dumps([cache_identity(cfg), cfg.data.decode, _unit_digests(units)], sort_keys=True)
    return Path(root or default_cache_root()) / f"teacher-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def ensure_auto_cache(cfg: Config, root: str | Path | None = None, *, build: bool = True,
                      poll_s: float = 5.0, **build_kwargs: Any) -> Path:
    """Build (or finish, or reuse) the cache of ``auto_cache_dir``; returns the folder.

    ``build=False`` is for the other ranks of a multi-process launch (torchrun, SLURM): they wait
    for the one that builds, since two builds of one folder would race."""
    folder = auto_cache_dir(cfg, root)
    if (folder / META).is_file():
        log.info("teacher.cache auto: using %s", folder)
        return folder
    if not build:
        waited = 0.0
        while not (folder / META).is_file():
            if waited % 600 < poll_s:
                log.info("waiting for rank 0 to build the teacher cache %s", folder)
            time.sleep(poll_s)
            waited += poll_s
        return folder
    log.info("teacher.cache auto: running the teacher once over the training images into %s", folder)
    build_teacher_cache(cfg, folder, **build_kwargs)
    return folder
