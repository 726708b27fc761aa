"""Open Clip Art Library drawings (Debian ``openclipart-svg`` + ``openclipart-png``) as captions.

Each drawing is ``svg/CATEGORY/.../NAME.svg`` with a rendered ``png/CATEGORY/.../NAME.png``
beside it in the other tree. The SVG's RDF metadata names the work (``<dc:title>``, the first
one: later titles belong to the author and publisher agents) and sometimes describes it
(``<dc:description>``). Like web alt-text, these are noisy, so an importer decides what counts
as a caption:

- a title shared by more than ``max_title_repeats`` drawings names a collection ("gramastar",
  "Part of the Flat Icon Collection ...", "card"), not the drawing: dropped;
- "Clipart by AUTHOR - file_name" titles are file names: dropped;
- underscores and dashes become spaces and trailing numbers go ("Tigre02" -> "Tigre");
- a description that is not the title, not an address, hash or e-mail, and at most
  ``max_description_words`` long becomes a second caption of the same drawing.

Drawings with no caption left, and renders above ``max_pixels`` (a few are 100-230
megapixels), are skipped and counted by reason. The split (train/val/test)
is fixed by a hash of the path within each top-level category, as for Tux Paint. Images are
referenced in place; the PNGs have transparency, which the loader composites onto white.
"""

from __future__ import annotations

import html
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import write_json_atomic
from .common import AssetMissing, assign_splits

DEFAULT_ROOT = Path("/usr/share/openclipart")
OPENCLIPART_INSTALL = "apt-get update && apt-get install -y --no-install-recommends openclipart-svg openclipart-png"
KARPATHY_NAME = "openclipart_karpathy.json"
_WHAT = "Open Clip Art Library drawings"
_HEAD_BYTES = 256 * 1024  # the metadata sits before the drawing's paths; some files are megabytes
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_DESCRIPTION = re.compile(r"<dc:description>(.*?)</dc:description>", re.S)
MAX_PIXELS = 4_000_000  # a few renders are 100-230 megapixels: seconds and gigabytes to decode, for 56-224 px
_JUNK_DESCRIPTION = re.compile(r"HASH\(|https?://|www\.|@|\.svg\b|\.eps\b|inkscape", re.I)


@dataclass(frozen=True)
class Drawing:
    path: str  # PNG path relative to the png root, POSIX separators
    category: str  # top-level folder ("animals", "food", ...)
    captions: tuple[str, ...]


def openclipart_root(root: Path | None = None) -> Path:
    """The library at `root` (default: the installed one) with both its svg/ and png/ trees, or
    :class:`AssetMissing`."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    for tree in ("svg", "png"):
        if not (root / tree).is_dir():
            raise AssetMissing(_WHAT, f"no {root / tree} folder", OPENCLIPART_INSTALL)
    return root


def read_metadata(svg: Path) -> tuple[str, str]:
    """(title, description) of the work, whitespace collapsed; empty strings where absent."""
    with open(svg, "rb") as f:
        head = f.read(_HEAD_BYTES).decode("utf-8", errors="replace")

    def first(pattern: re.Pattern[str]) -> str:
        match = pattern.search(head)
        return " ".join(html.unescape(match.group(1)).split()) if match else ""

    return first(_TITLE), first(_DESCRIPTION)


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's header without decoding it; None when it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def clean_title(title: str) -> str:
    """Underscores/dashes to spaces, trailing numbering removed ("lightbulb-notlit_02" -> "lightbulb notlit")."""
    text = re.sub(r"[_\-]+", " ", title)
    text = re.sub(r"[\s\d.]+$", "", text)
    return " ".join(text.split())


def captions_of(title: str, description: str, title_counts: Counter[str], max_title_repeats: int,
                max_description_words: int) -> tuple[list[str], str | None]:
    """The drawing's captions and, when there are none, the reason it is skipped."""
    captions = []
    key = title.lower()
    if not title:
        reason = "no_title"
    elif key.startswith("clipart by"):
        reason = "file_name_title"
    elif title_counts[key] > max_title_repeats:
        reason = "collection_title"
    else:
        reason = None
        cleaned = clean_title(title)
        if cleaned:
            captions.append(cleaned)
    if (description and description.lower() not in (key, clean_title(title).lower())
            and not _JUNK_DESCRIPTION.search(description) and len(description.split()) <= max_description_words):
        captions.append(description)
    return captions, (None if captions else reason or "no_title")


def scan_drawings(root: Path, max_title_repeats: int = 3, max_description_words: int = 30,
                  max_pixels: int = MAX_PIXELS) -> tuple[list[Drawing], dict[str, int]]:
    """Captioned drawings sorted by path, and how many were skipped for each reason."""
    svg_root, png_root = root / "svg", root / "png"
    skipped = {"no_png": 0, "too_large": 0, "no_title": 0, "file_name_title": 0, "collection_title": 0}
    found: list[tuple[str, str, str, str]] = []
    for svg in sorted(svg_root.rglob("*.svg")):
        rel = svg.relative_to(svg_root).with_suffix(".png")
        size = png_size(png_root / rel) if (png_root / rel).is_file() else None
        if size is None:
            skipped["no_png"] += 1
            continue
        if size[0] * size[1] > max_pixels:
            skipped["too_large"] += 1
            continue
        title, description = read_metadata(svg)
        found.append((rel.as_posix(), rel.parts[0] if len(rel.parts) > 1 else "", title, description))
    counts = Counter(title.lower() for _, _, title, _ in found if title)
    drawings = []
    for path, category, title, description in found:
        captions, reason = captions_of(title, description, counts, max_title_repeats, max_description_words)
        if reason is not None:
            skipped[reason] += 1
        else:
            drawings.append(Drawing(path, category, tuple(captions)))
    return drawings, skipped


def import_openclipart(root: Path | None, out_dir: Path, val_fraction: float = 0.05, test_fraction: float = 0.1,
                       filename: str = KARPATHY_NAME, max_title_repeats: int = 3, max_pixels: int = MAX_PIXELS) -> Path:
    """Write a Karpathy-format JSON of the captioned drawings (images in the png/ tree); returns its path."""
    root = openclipart_root(root)
    drawings, skipped = scan_drawings(root, max_title_repeats, max_pixels=max_pixels)
    if not drawings:
        raise AssetMissing(_WHAT, f"no captioned drawings under {root} (skipped: {skipped})", OPENCLIPART_INSTALL)
    splits = assign_splits(drawings, val_fraction, test_fraction)
    images: list[dict[str, Any]] = []
    counts = {"train": 0, "val": 0, "test": 0}
    sentid = 0
    for imgid, drawing in enumerate(drawings):
        folder, _, name = drawing.path.rpartition("/")
        split = splits[drawing.path]
        counts[split] += 1
        sentences = []
        for caption in drawing.captions:
            sentences.append({"raw": caption, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append({"filepath": folder, "filename": name, "split": split, "imgid": imgid,
                       "category": drawing.category, "sentences": sentences})
    out = Path(out_dir) / filename
    write_json_atomic(out, {
        "dataset": "openclipart",
        "image_root": str((root / "png").resolve()),
        "split_rule": f"per category, blake2b(path) order; test={test_fraction}, val={val_fraction}",
        "caption_rule": f"SVG dc:title (dropped when shared by more than {max_title_repeats} drawings) "
                        "+ dc:description when it is a plain short sentence",
        "counts": counts,
        "skipped": skipped,
        "images": images,
    })
    return out
