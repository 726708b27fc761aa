"""Caption records read from Karpathy JSON files and JSONL/CSV manifests.

Readers validate eagerly and fail with a :class:`DataError` naming the file, the field and
the offending value, so a broken annotation file stops a run before any GPU time is spent.
Images are *not* opened here (that is per-sample work for the datasets).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unialign.config import KarpathySource, ManifestSource

log = logging.getLogger(__name__)

_INT64_MASK = (1 << 63) - 1


class DataError(ValueError):
    """Malformed or unusable data, with the file, field and value in the message."""


@dataclass(frozen=True)
class Record:
    """One image-caption pair; ``image`` is a file path (or, for shards, a sample key)."""

    image: str
    caption: str
    image_id: int


@dataclass(frozen=True)
class RecordSet:
    """Records of one source plus what was dropped while reading it (for run statistics)."""

    records: list[Record]
    skipped_empty: int
    source: str


@dataclass(frozen=True)
class RetrievalSet:
    """Unique images and all their captions, the layout retrieval metrics need."""

    images: list[str]
    captions: list[str]
    caption_to_image: list[int]  # caption i belongs to images[caption_to_image[i]]
    image_ids: list[int] = field(default_factory=list)
    skipped_empty: int = 0


def stable_id(text: str) -> int:
    """A non-negative int64 from ``text`` that is the same in every process and run.

    Python's ``hash()`` is salted per process, so it cannot identify an image across
    DataLoader workers, ranks or resumed runs.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _INT64_MASK


def _clean_caption(raw: Any, where: str) -> str | None:
    """The stripped caption, or None when it is empty (the caller counts it)."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise DataError(f"{where}: caption must be a string, got {raw!r}")
    text = " ".join(raw.split())
    return text or None


def _parse_id(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: image id must be an integer, got {value!r}")
    if isinstance(value, int):
        parsed = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        parsed = int(value.strip())
    else:
        raise DataError(f"{where}: image id must be an integer, got {value!r}")
    if not -(1 << 63) <= parsed <= _INT64_MASK:
        raise DataError(f"{where}: image id {parsed} does not fit in int64")
    return parsed


# ---------------------------------------------------------------------------------------
# Karpathy JSON (dataset_coco.json, dataset_flickr30k.json)


def _load_karpathy_images(json_path: Path) -> list[Any]:
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{json_path}: not valid JSON ({err})") from None
    except OSError as err:
        raise DataError(f"{json_path}: cannot read ({err})") from None
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{json_path}: field 'images' is missing (not a Karpathy-format file)")
    images = data["images"]
    if not isinstance(images, list):
        raise DataError(f"{json_path}: field 'images' must be a list, got {type(images).__name__}")
    return images


def _field(entry: Any, name: str, kind: type, where: str, json_path: Path) -> Any:
    if not isinstance(entry, dict):
        raise DataError(f"{json_path}: {where} must be an object, got {entry!r}")
    if name not in entry:
        raise DataError(f"{json_path}: field '{where}.{name}' is missing")
    value = entry[name]
    if not isinstance(value, kind):
        raise DataError(f"{json_path}: field '{where}.{name}' must be {kind.__name__}, got {value!r}")
    return value


def _iter_karpathy(json_path: Path, image_root: Path, splits: Sequence[str]
                   ) -> Iterator[tuple[str, int, list[str | None]]]:
    """(image path, image id, cleaned captions) for each image in ``splits``."""
    json_path = Path(json_path)
    images = _load_karpathy_images(json_path)
    wanted = set(splits)
    found: dict[str, int] = {}
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        split = _field(entry, "split", str, where, json_path)
        found[split] = found.get(split, 0) + 1
        if split not in wanted:
            continue
        filename = _field(entry, "filename", str, where, json_path)
        filepath = entry.get("filepath") or ""
        if not isinstance(filepath, str):
            raise DataError(f"{json_path}: field '{where}.filepath' must be str, got {filepath!r}")
        sentences = _field(entry, "sentences", list, where, json_path)
        rel = Path(filepath, filename).as_posix()
        captions = [_clean_caption(_field(s, "raw", str, f"{where}.sentences[{j}]", json_path),
                                   f"{json_path}: {where}.sentences[{j}].raw")
                    for j, s in enumerate(sentences)]
        yield str(Path(image_root) / rel), stable_id(rel), captions
    missing = sorted(wanted - found.keys())
    if missing:
        if not wanted & found.keys():
            raise DataError(f"{json_path}: no image has split in {sorted(wanted)} (splits present: {sorted(found)})")
        log.warning("%s: no images in split(s) %s (present: %s)", json_path, missing, sorted(found))


def read_karpathy(json_path: Path | str, image_root: Path | str, splits: Sequence[str]) -> RecordSet:
    """One :class:`Record` per caption of every image in ``splits``.

    ``image_id`` hashes the image's relative path (``filepath/filename``): the Karpathy
    ``cocoid``/``imgid`` numbers of different datasets overlap, paths do not.
    """
    records: list[Record] = []
    skipped = 0
    for image, image_id, captions in _iter_karpathy(Path(json_path), Path(image_root), splits):
        for caption in captions:
            if caption is None:
                skipped += 1
            else:
                records.append(Record(image, caption, image_id))
    if skipped:
        log.warning("%s: skipped %d empty caption(s)", json_path, skipped)
    return RecordSet(records, skipped, str(json_path))


def retrieval_set(records: Iterable[Record], skipped_empty: int = 0) -> RetrievalSet:
    """Group pairs by image (first-seen order) into the gallery/query layout of retrieval."""
    index: dict[int, int] = {}
    images: list[str] = []
    image_ids: list[int] = []
    captions: list[str] = []
    caption_to_image: list[int] = []
    for rec in records:
        if rec.image_id not in index:
            index[rec.image_id] = len(images)
            images.append(rec.image)
            image_ids.append(rec.image_id)
        captions.append(rec.caption)
        caption_to_image.append(index[rec.image_id])
    return RetrievalSet(images, captions, caption_to_image, image_ids, skipped_empty)


def read_karpathy_eval(json_path: Path | str, image_root: Path | str, split: str) -> RetrievalSet:
    """Unique images of one split with their captions; images left without captions are dropped
    (they would be retrieval queries with no correct answer)."""
    rs = read_karpathy(json_path, image_root, [split])
    return retrieval_set(rs.records, rs.skipped_empty)


# ---------------------------------------------------------------------------------------
# Manifests: JSONL or CSV, one pair per row


def _manifest_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location for messages, row) for each non-blank row."""
    suffix = path.suffix.lower()
    try:
        f = open(path, encoding="utf-8", newline="")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    with f:
        if suffix == ".jsonl":
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: row must be a JSON object, got {row!r}")
                yield f"{path}:{lineno}", row
        elif suffix == ".csv":
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{path}:{reader.line_num}", row
        else:
            raise DataError(f"{path}: manifest must be .jsonl or .csv, got suffix {path.suffix!r}")


def read_manifest(path: Path | str, image_root: Path | str | None = None, image_column: str = "image",
                  caption_column: str = "caption", id_column: str = "image_id") -> RecordSet:
    """Pairs from a JSONL/CSV manifest; relative image paths are joined to ``image_root``
    (default: the manifest's folder). Rows without an id get a hash of the image path as
    written in the manifest, so the same image always gets the same id."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    records: list[Record] = []
    skipped = 0
    for where, row in _manifest_rows(path):
        for column in (image_column, caption_column):
            if column not in row:
                raise DataError(f"{where}: field '{column}' is missing (fields: {sorted(row)})")
        image = row[image_column]
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: field '{image_column}' must be a non-empty path, got {image!r}")
        caption = _clean_caption(row[caption_column], f"{where}: field '{caption_column}'")
        if caption is None:
            skipped += 1
            continue
        raw_id = row.get(id_column)
        image_id = (stable_id(Path(image).as_posix()) if raw_id is None or raw_id == ""
                    else _parse_id(raw_id, f"{where}: field '{id_column}'"))
        records.append(Record(str(root / image), caption, image_id))
    if not records:
        raise DataError(f"{path}: no usable rows ({skipped} empty caption(s))")
    if skipped:
        log.warning("%s: skipped %d empty caption(s)", path, skipped)
    return RecordSet(records, skipped, str(path))


def namespaced_id(namespace: str, image_id: int) -> int:
    """A source's own image id, made unique across sources (see ``id_namespace`` in the config)."""
    return stable_id(f"{namespace}\x1f{image_id}")


def read_source(source: KarpathySource | ManifestSource, karpathy_splits: Sequence[str] | None = None) -> RecordSet:
    """A map-style config source's records, image ids namespaced by the source."""
    if isinstance(source, KarpathySource):
        rs = read_karpathy(source.path, source.images, source.splits if karpathy_splits is None else karpathy_splits)
    else:
        rs = read_manifest(source.path, source.images, source.image_column, source.caption_column, source.id_column)
    ns = source.namespace()
    return RecordSet([Record(r.image, r.caption, namespaced_id(ns, r.image_id)) for r in rs.records],
                     rs.skipped_empty, rs.source)
