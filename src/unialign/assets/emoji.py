"""Emoji rendered from a colour font (Debian ``fonts-noto-color-emoji``) and named by Unicode CLDR
(``unicode-cldr-core``) as a captioned image set.

CLDR's English annotations give each emoji a spoken name (``<annotation cp="🫐" type="tts">
blueberries</annotation>``); the caption is that name written as a sentence ("Blueberries."),
the style of Tux Paint's stamp descriptions. Each emoji the font draws is rendered once at the
font's bitmap size (Noto Color Emoji's strikes are 109 px) onto a transparent canvas, saved as
``images/<code points in hex>.png``; the loader composites it onto white, like a stamp.

What is skipped, and why: annotations whose characters the font does not draw (CLDR also names
punctuation, currency and other text symbols: they render as nothing) and names already taken by
an earlier emoji (a caption must point at one image). The split (train/val/test) is fixed by a
hash of the file name, as for the other importers.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import write_json_atomic
from .common import AssetMissing, assign_splits, staged_dir

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
DEFAULT_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
EMOJI_INSTALL = ("apt-get update && apt-get install -y --no-install-recommends fonts-noto-color-emoji "
                 "unicode-cldr-core")
KARPATHY_NAME = "emoji_karpathy.json"
FONT_SIZE = 109  # the only size a CBDT bitmap font like Noto Color Emoji can be opened at
_MARKER = ".unialign-emoji.json"
_WHAT = "Noto Color Emoji with CLDR names"


class AnnotationError(ValueError):
    """A CLDR annotations file that cannot be read."""


@dataclass(frozen=True)
class Emoji:
    chars: str
    path: str  # images/<hex>.png, relative to the output folder
    category: str  # one stratum: CLDR's annotations carry no groups
    caption: str


def emoji_sources(font: Path | None = None, annotations: Path | None = None) -> tuple[Path, Path]:
    """The font and the English annotations (default: the Debian packages'), or :class:`AssetMissing`."""
    font = Path(font) if font is not None else DEFAULT_FONT
    annotations = Path(annotations) if annotations is not None else DEFAULT_ANNOTATIONS
    for path in (font, annotations):
        if not path.is_file():
            raise AssetMissing(_WHAT, f"no {path}", EMOJI_INSTALL)
    return font, annotations


def read_names(annotations: Path) -> list[tuple[str, str]]:
    """(characters, spoken name) of every ``type="tts"`` annotation, in file order."""
    try:
        root = ET.parse(annotations).getroot()
    except (ET.ParseError, OSError) as err:
        raise AnnotationError(f"{annotations}: not a readable CLDR annotations file ({err})") from None
    names = [(a.get("cp") or "", " ".join((a.text or "").split())) for a in root.iter("annotation")
             if a.get("type") == "tts"]
    return [(chars, name) for chars, name in names if chars and name]


def as_sentence(name: str) -> str:
    """"blueberries" -> "Blueberries."; a name ending in punctuation keeps it ("OK!" stays)."""
    text = name[0].upper() + name[1:]
    return text if text[-1] in ".!?" else text + "."


def import_emoji(font: Path | None, annotations: Path | None, out_dir: Path, val_fraction: float = 0.1,
                 test_fraction: float = 0.2) -> Path:
    """Render the named emoji into ``out_dir/images`` and write a Karpathy-format JSON beside them;
    returns its path. ``out_dir`` is replaced as a whole (staged, then renamed) and only if it is
    empty or an earlier import."""
    from PIL import Image, ImageDraw, ImageFont

    font, annotations = emoji_sources(font, annotations)
    try:
        face = ImageFont.truetype(str(font), FONT_SIZE)
    except OSError as err:
        raise AssetMissing(_WHAT, f"{font}: not a font PIL can open at {FONT_SIZE} px ({err})", EMOJI_INSTALL) from None
    left, top, right, bottom = face.getbbox("\N{GRINNING FACE}")
    canvas = (max(right - left, 1), max(bottom - top, 1))
    out_dir = Path(out_dir)
    skipped = {"not_drawn": 0, "duplicate_name": 0}
    emoji: list[Emoji] = []
    seen: set[str] = set()
    with staged_dir(out_dir, _MARKER) as stage:
        (stage / "images").mkdir()
        for chars, name in read_names(annotations):
            caption = as_sentence(name)
            if caption.lower() in seen:
                skipped["duplicate_name"] += 1
                continue
            image = Image.new("RGBA", canvas, (0, 0, 0, 0))
            # black is for glyphs without colour layers (the default ink is white, invisible on the loader's white)
            ImageDraw.Draw(image).text((-left, -top), chars, font=face, fill="black", embedded_color=True)
            if image.getbbox() is None:
                skipped["not_drawn"] += 1
                continue
            seen.add(caption.lower())
            rel = "images/" + "-".join(f"{ord(c):x}" for c in chars) + ".png"
            image.save(stage / rel)
            emoji.append(Emoji(chars, rel, "", caption))
        if not emoji:
            raise AssetMissing(_WHAT, f"{font} draws none of the {annotations} emoji (skipped: {skipped})",
                               EMOJI_INSTALL)
        splits = assign_splits(emoji, val_fraction, test_fraction)
        images: list[dict[str, Any]] = []
        counts = {"train": 0, "val": 0, "test": 0}
        for imgid, item in enumerate(emoji):
            counts[splits[item.path]] += 1
            images.append({"filepath": "images", "filename": item.path.split("/", 1)[1], "chars": item.chars,
                           "split": splits[item.path], "imgid": imgid,
                           "sentences": [{"raw": item.caption, "imgid": imgid, "sentid": imgid}]})
        write_json_atomic(stage / KARPATHY_NAME, {
            "dataset": "noto-color-emoji-cldr",
            "image_root": ".",  # relative to this file's folder
            "font": str(font), "annotations": str(annotations),
            "split_rule": f"blake2b(path) order; test={test_fraction}, val={val_fraction}",
            "counts": counts, "skipped": skipped, "images": images,
        })
        write_json_atomic(stage / _MARKER, {"font": str(font), "annotations": str(annotations)})
    return out_dir / KARPATHY_NAME

