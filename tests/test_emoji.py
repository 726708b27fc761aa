"""Emoji importer on a font and a CLDR annotations file the test writes: captions, skips, fixed split,
rendered images that load, the staged output folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from unialign.assets import AssetMissing
from unialign.assets.emoji import AnnotationError, as_sentence, import_emoji, read_names
from unialign.data.images import load_image
from unialign.data.records import read_karpathy

LETTERS = "ABCDEFGHIJKL"


def _annotations(path: Path, entries: list[tuple[str, str, str | None]]) -> Path:
    lines = [f'<annotation cp="{cp}"{f" type={chr(34)}{kind}{chr(34)}" if kind else ""}>{text}</annotation>'
             for cp, text, kind in entries]
    path.write_text('<?xml version="1.0" encoding="UTF-8"?>\n<ldml><identity><language type="en"/></identity>'
                    "<annotations>\n" + "\n".join(lines) + "\n</annotations></ldml>\n", encoding="utf-8")
    return path


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    """Pillow's own scalable font (any size opens) and 12 named letters, a blank, a repeated name."""
    font = tmp_path / "font.ttf"
    font.write_bytes(ImageFont.load_default(20).font_bytes)
    entries: list[tuple[str, str, str | None]] = []
    for ch in LETTERS:
        entries += [(ch, f"letter {ch.lower()} | letter", None), (ch, f"  letter   {ch.lower()} ", "tts")]
    entries += [(" ", "space", "tts"),  # the font draws nothing for it
                ("a", "letter A", "tts"),  # a name already taken (case aside)
                ("?", "", "tts")]  # no name
    return font, _annotations(tmp_path / "en.xml", entries)


def test_as_sentence() -> None:
    assert as_sentence("blueberries") == "Blueberries."
    assert as_sentence("OK hand!") == "OK hand!"
    assert as_sentence("flag: Japan") == "Flag: Japan."


def test_read_names_keeps_spoken_names_only(sources: tuple[Path, Path]) -> None:
    names = read_names(sources[1])
    assert names[:2] == [("A", "letter a"), ("B", "letter b")]
    assert len(names) == len(LETTERS) + 2  # keyword lines and the nameless entry are not names


def test_import_captions_skips_split_and_images(sources: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "emoji"
    path = import_emoji(*sources, out)
    data = json.loads(path.read_text())
    assert data["skipped"] == {"not_drawn": 1, "duplicate_name": 1}
    captions = [im["sentences"][0]["raw"] for im in data["images"]]
    assert captions == [f"Letter {ch.lower()}." for ch in LETTERS]
    # 12 items, one stratum: round(2.4) test, round(1.2) val, the rest train
    assert data["counts"] == {"train": 9, "val": 1, "test": 2}
    assert [im["filename"] for im in data["images"]][:2] == ["41.png", "42.png"]
    records = read_karpathy(path, out / data["image_root"], ["train", "val", "test"]).records
    assert len(records) == len(LETTERS)
    for record in records:
        rendered = Image.open(record.image)
        assert rendered.mode == "RGBA"
        alpha = np.asarray(rendered)[..., 3]
        assert 0 < (alpha > 0).mean() < 1  # a drawn glyph on a transparent canvas
        loaded = np.asarray(load_image(record.image))  # composited onto white for the model
        assert loaded.shape[2] == 3 and loaded.min() < 128 and loaded.max() == 255
    # the split depends on the file names only: a second import gives the same one
    again = json.loads(import_emoji(*sources, out).read_text())
    assert [im["split"] for im in again["images"]] == [im["split"] for im in data["images"]]


def test_import_refuses_a_foreign_folder(sources: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by unialign"):
        import_emoji(*sources, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_missing_or_bad_inputs_say_what(sources: tuple[Path, Path], tmp_path: Path) -> None:
    font, annotations = sources
    with pytest.raises(AssetMissing, match="fonts-noto-color-emoji unicode-cldr-core") as err:
        import_emoji(tmp_path / "absent.ttf", annotations, tmp_path / "a")
    assert "absent.ttf" in str(err.value)
    broken = tmp_path / "broken.xml"
    broken.write_text("<ldml><annotations>")
    with pytest.raises(AnnotationError, match="broken.xml"):
        import_emoji(font, broken, tmp_path / "b")
    not_a_font = tmp_path / "font.txt"
    not_a_font.write_text("hello")
    with pytest.raises(AssetMissing, match="font.txt: not a font"):
        import_emoji(not_a_font, annotations, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
