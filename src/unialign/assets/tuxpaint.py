"""Tux Paint's stamp library (Debian ``tuxpaint-stamps-default``) as a small captioned image set.

Each stamp is ``NAME.png`` with ``NAME.txt`` beside it whose first line is the English
description ("A koala.") and whose later lines are translations (``de.utf8=...``). About
half are cut-out photos on transparent backgrounds: :func:`unialign.data.images.load_image`
composites them onto white. Images are referenced in place (the Karpathy JSON stores
paths relative to the stamps folder), so nothing is copied.

What is skipped, and why: ``NAME_mirror.png`` (the image shown when a stamp already
included is mirrored), stamps without a ``.txt`` or with an empty first line (no caption), and
SVG-only stamps (not raster images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import write_json_atomic
from .common import AssetMissing, assign_splits

DEFAULT_STAMPS_ROOT = Path("/usr/share/tuxpaint/stamps")
TUXPAINT_INSTALL = "apt-get update && apt-get install -y --no-install-recommends tuxpaint-stamps-default"
KARPATHY_NAME = "tuxpaint_karpathy.json"
_WHAT = "Tux Paint stamps"


class StampError(ValueError):
    """A stamp description file that cannot be read as text."""


@dataclass(frozen=True)
class Stamp:
    path: str  # relative to the stamps root, POSIX separators
    category: str  # top-level folder ("animals", "food", ...)
    caption: str


def tuxpaint_root() -> Path:
    """The installed stamps folder, or :class:`AssetMissing` with the apt command."""
    if not DEFAULT_STAMPS_ROOT.is_dir() or next(DEFAULT_STAMPS_ROOT.rglob("*.png"), None) is None:
        raise AssetMissing(_WHAT, f"no PNG stamps under {DEFAULT_STAMPS_ROOT}", TUXPAINT_INSTALL)
    return DEFAULT_STAMPS_ROOT


def read_caption(txt: Path) -> str | None:
    """The English description (first line, whitespace collapsed), or None when it is empty."""
    try:
        text = txt.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise StampError(f"{txt}: not UTF-8 text ({err})") from None
    lines = text.splitlines()
    caption = " ".join(lines[0].split()) if lines else ""
    return caption or None


def scan_stamps(root: Path) -> tuple[list[Stamp], dict[str, int]]:
    """Captioned stamps sorted by path, and how many files were skipped for each reason."""
    skipped = {"mirror": 0, "no_txt": 0, "empty_caption": 0, "svg_only": 0}
    stamps: list[Stamp] = []
    for png in sorted(root.rglob("*.png")):
        if png.stem.endswith("_mirror") and png.with_name(png.stem[: -len("_mirror")] + ".png").is_file():
            skipped["mirror"] += 1
            continue
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            skipped["no_txt"] += 1
            continue
        caption = read_caption(txt)
        if caption is None:
            skipped["empty_caption"] += 1
            continue
        rel = png.relative_to(root)
        stamps.append(Stamp(rel.as_posix(), rel.parts[0] if len(rel.parts) > 1 else "", caption))
    skipped["svg_only"] = sum(1 for svg in root.rglob("*.svg") if not svg.with_suffix(".png").is_file())
    return stamps, skipped


def import_tuxpaint(stamps_root: Path | None, out_dir: Path, val_fraction: float = 0.1,
                    test_fraction: float = 0.2, filename: str = KARPATHY_NAME) -> Path:
    """Write a Karpathy-format JSON of the captioned stamps; returns its path.

    ``stamps_root=None`` means the Debian package's folder. Entries' ``filepath`` is
    relative to the stamps root (also stored as the top-level ``image_root``), so a
    training config uses ``{"type": "karpathy", "path": <json>, "images": <stamps root>}``.
    """
    root = Path(stamps_root) if stamps_root is not None else tuxpaint_root()
    if not root.is_dir():
        raise AssetMissing(_WHAT, f"{root} is not a folder", TUXPAINT_INSTALL)
    stamps, skipped = scan_stamps(root)
    if not stamps:
        raise AssetMissing(_WHAT, f"no captioned PNG stamps under {root} (skipped: {skipped})", TUXPAINT_INSTALL)
    splits = assign_splits(stamps, val_fraction, test_fraction)
    images: list[dict[str, Any]] = []
    counts = {"train": 0, "val": 0, "test": 0}
    for imgid, stamp in enumerate(stamps):
        folder, _, name = stamp.path.rpartition("/")
        split = splits[stamp.path]
        counts[split] += 1
        sentence = {"raw": stamp.caption, "imgid": imgid, "sentid": imgid}
        images.append({"filepath": folder, "filename": name, "split": split, "imgid": imgid,
                       "category": stamp.category, "sentences": [sentence]})
    out = Path(out_dir) / filename
    write_json_atomic(out, {
        "dataset": "tuxpaint-stamps",
        "image_root": str(root.resolve()),
        "split_rule": f"per category, blake2b(path) order; test={test_fraction}, val={val_fraction}",
        "counts": counts,
        "skipped": skipped,
        "images": images,
    })
    return out
