"""A tiny generated world of captioned shapes, for tests and the offline demo.

Each image holds one coloured shape at a described position and size, and its captions
say so in varied words ("a large red circle on the left", "a big crimson disc at the left
side"), so a retrieval model has something real but cheap to learn. Writers turn records
into the other supported formats (manifests, webdataset shards).
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw

from unialign.data.records import Record

COLOURS: dict[str, tuple[tuple[int, int, int], list[str]]] = {
    "red": ((220, 30, 30), ["red", "crimson", "scarlet"]),
    "green": ((30, 170, 60), ["green", "emerald"]),
    "blue": ((30, 70, 220), ["blue", "navy", "azure"]),
    "yellow": ((240, 220, 40), ["yellow", "golden"]),
    "purple": ((140, 50, 170), ["purple", "violet"]),
    "orange": ((245, 140, 20), ["orange", "amber"]),
    "pink": ((245, 120, 190), ["pink", "rose"]),
    "black": ((20, 20, 20), ["black", "dark"]),
}
SHAPES: dict[str, list[str]] = {
    "circle": ["circle", "disc", "round shape"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge"],
    "diamond": ["diamond", "rhombus"],
    "cross": ["cross", "plus sign"],
}
POSITIONS: dict[str, list[str]] = {
    "left": ["on the left", "at the left side", "to the left"],
    "right": ["on the right", "at the right side", "to the right"],
    "top": ["at the top", "near the top edge", "up high"],
    "bottom": ["at the bottom", "near the bottom edge", "down low"],
    "center": ["in the center", "in the middle", "at the centre"],
}
SIZES: dict[str, list[str]] = {"small": ["small", "tiny", "little"], "large": ["large", "big", "huge"]}
TEMPLATES = [
    "a {size} {colour} {shape} {position}",
    "there is a {size} {colour} {shape} {position}",
    "{position} sits a {colour} {shape} that is {size}",
    "a picture of a {colour} {shape}, {size}, {position}",
]
_BACKGROUNDS = [(245, 245, 240), (200, 200, 200), (235, 225, 205), (205, 225, 235), (120, 120, 120),
                (60, 60, 70)]
_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
            "center": (0.5, 0.5)}


def _contrasting_backgrounds(colour: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    return [b for b in _BACKGROUNDS if sum(abs(x - y) for x, y in zip(b, colour, strict=True)) > 150]


def _draw(shape: str, colour: tuple[int, int, int], position: str, size: str, image_size: int,
          background: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    cx, cy = (c * image_size for c in _CENTRES[position])
    r = image_size * (0.2 if size == "large" else 0.1)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a))
                      for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:  # cross
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    return img


def _caption(rng: random.Random, shape: str, colour: str, position: str, size: str) -> str:
    return rng.choice(TEMPLATES).format(size=rng.choice(SIZES[size]), colour=rng.choice(COLOURS[colour][1]),
                                        shape=rng.choice(SHAPES[shape]), position=rng.choice(POSITIONS[position]))


def vocabulary() -> list[str]:
    """Every word the captions can contain (e.g. for a tiny test tokenizer)."""
    words = {w for t in TEMPLATES for w in t.replace(",", " , ").split() if not w.startswith("{")}
    for synonyms in [*(ws for _, ws in COLOURS.values()), *SHAPES.values(), *POSITIONS.values(), *SIZES.values()]:
        words.update(w for phrase in synonyms for w in phrase.split())
    return sorted(words)


def make_synthetic_karpathy(root: Path, n_images: int, captions_per_image: int = 2, image_size: int = 64,
                            seed: int = 0, split_counts: dict[str, int] | None = None) -> Path:
    """Write ``root/images/*.png`` and ``root/dataset_synthetic.json`` (Karpathy format).

    ``split_counts`` assigns the images, in order, to splits (default: all "train"); it
    must add up to ``n_images``. Returns the JSON path.
    """
    split_counts = split_counts or {"train": n_images}
    if sum(split_counts.values()) != n_images:
        raise ValueError(f"split_counts {split_counts} must add up to n_images={n_images}")
    splits = [name for name, count in split_counts.items() for _ in range(count)]
    rng = random.Random(seed)
    image_dir = Path(root) / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, split in enumerate(splits):
        shape, colour, position, size = (rng.choice(sorted(d)) for d in (SHAPES, COLOURS, POSITIONS, SIZES))
        background = rng.choice(_contrasting_backgrounds(COLOURS[colour][0]))
        filename = f"{i:06d}.png"
        _draw(shape, COLOURS[colour][0], position, size, image_size, background).save(image_dir / filename)
        entries.append({"filepath": "images", "filename": filename, "split": split, "imgid": i, "cocoid": i,
                        "sentences": [{"raw": _caption(rng, shape, colour, position, size)}
                                      for _ in range(captions_per_image)]})
    json_path = Path(root) / "dataset_synthetic.json"
    json_path.write_text(json.dumps({"dataset": "synthetic", "images": entries}))
    return json_path


def write_manifest(records: Sequence[Record], path: Path, relative_to: Path | None = None) -> Path:
    """Write records as .jsonl or .csv (columns image, caption, image_id); image paths are
    made relative to ``relative_to`` when given."""
    path = Path(path)

    def image(rec: Record) -> str:
        return Path(rec.image).relative_to(relative_to).as_posix() if relative_to else rec.image

    rows = [{"image": image(r), "caption": r.caption, "image_id": r.image_id} for r in records]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "caption", "image_id"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"manifest must be .jsonl or .csv, got {path}")
    return path


def write_webdataset_shards(records: Sequence[Record], out_dir: Path, pairs_per_shard: int,
                            caption_in: Literal["txt", "json"] = "txt", prefix: str = "shard") -> str:
    """Write one tar member set per pair (``<key>.png|jpg`` + ``.txt`` or ``.json``
    {"caption", "image_id"}); returns the brace pattern of the shard paths."""
    from unialign.data.datasets import webdataset

    wds = webdataset()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, math.ceil(len(records) / pairs_per_shard))
    for s in range(n_shards):
        with wds.TarWriter(str(out_dir / f"{prefix}-{s:06d}.tar")) as sink:
            for i in range(s * pairs_per_shard, min(len(records), (s + 1) * pairs_per_shard)):
                rec = records[i]
                ext = Path(rec.image).suffix.lower().lstrip(".").replace("jpeg", "jpg") or "jpg"
                sample = {"__key__": f"{i:08d}", ext: Path(rec.image).read_bytes()}
                if caption_in == "txt":
                    sample["txt"] = rec.caption
                    sample["json"] = {"image_id": rec.image_id}
                else:
                    sample["json"] = {"caption": rec.caption, "image_id": rec.image_id}
                sink.write(sample)
    return str(out_dir / f"{prefix}-{{{0:06d}..{n_shards - 1:06d}}}.tar")
