"""Open Clip Art importer on a library the test builds: caption rules, skips, fixed split, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from unialign.assets import AssetMissing
from unialign.assets.openclipart import clean_title, import_openclipart
from unialign.data.images import load_image
from unialign.data.records import read_karpathy, read_karpathy_eval

SVG = """<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/">
<metadata><rdf:RDF><cc:Work>
<dc:title>{title}</dc:title>
<dc:description>{description}</dc:description>
<dc:creator><cc:Agent><dc:title>Some Author</dc:title></cc:Agent></dc:creator>
</cc:Work></rdf:RDF></metadata>
<path d="M 0 0 L 10 10"/></svg>
"""


def _drawing(root: Path, rel: str, title: str, description: str = "", png: bool = True,
             size: tuple[int, int] = (16, 12)) -> None:
    svg = root / "svg" / f"{rel}.svg"
    svg.parent.mkdir(parents=True, exist_ok=True)
    svg.write_text(SVG.format(title=title, description=description))
    if png:
        out = root / "png" / f"{rel}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGBA", size, (20, 120, 20, 255))
        img.putpixel((0, 0), (0, 0, 0, 0))
        img.save(out)


@pytest.fixture
def library(tmp_path: Path) -> Path:
    root = tmp_path / "openclipart"
    for i in range(20):
        _drawing(root, f"animals/mammals/dog_{i:02d}", f"Dog_number-{i}", "A dog sitting." if i == 0 else "")
    _drawing(root, "animals/cat_01", "Cat 01", "Cat 01")  # description repeats the title: one caption
    _drawing(root, "animals/bird", "bird", "HASH(0x862bbb8)")  # junk description
    _drawing(root, "food/apple", "Red &amp; green apple", "An apple, drawn with straight lines.")
    for i in range(5):  # a collection name shared by 5 drawings (> 3): not a caption
        _drawing(root, f"shapes/star_{i}", "gramastar")
    _drawing(root, "shapes/star_5", "gramastar", "A star with five points.")  # described: kept
    _drawing(root, "shapes/jigsaw_01", "Clipart by Nicu Buculei - jigsaw_red_10")
    _drawing(root, "shapes/empty", "")
    _drawing(root, "food/pear", "pear", png=False)  # no rendered PNG
    _drawing(root, "food/plum", "plum", size=(40, 30))  # above the test's pixel cap
    (root / "png" / "food" / "fig.png").write_text("not a png")
    _drawing(root, "food/fig", "fig", png=False)  # a PNG that is not one
    return root


def test_clean_title() -> None:
    assert clean_title("lightbulb-notlit_02") == "lightbulb notlit"
    assert clean_title("Tigre02") == "Tigre"
    assert clean_title("Pumpkin Pie (B and W)") == "Pumpkin Pie (B and W)"


def test_import_captions_skips_and_split(library: Path, tmp_path: Path) -> None:
    out = import_openclipart(library, tmp_path / "k", max_pixels=1000)
    data = json.loads(out.read_text())
    by_name = {e["filename"]: [s["raw"] for s in e["sentences"]] for e in data["images"]}
    assert by_name["dog_00.png"] == ["Dog number", "A dog sitting."]
    assert by_name["dog_07.png"] == ["Dog number"]
    assert by_name["cat_01.png"] == ["Cat"]
    assert by_name["bird.png"] == ["bird"]
    assert by_name["apple.png"] == ["Red & green apple", "An apple, drawn with straight lines."]
    assert by_name["star_5.png"] == ["A star with five points."]
    assert "star_0.png" not in by_name and "jigsaw_01.png" not in by_name and "empty.png" not in by_name
    assert data["skipped"] == {"no_png": 2, "too_large": 1, "no_title": 1, "file_name_title": 1,
                               "collection_title": 5}
    sentids = [s["sentid"] for e in data["images"] for s in e["sentences"]]
    assert sentids == list(range(len(sentids)))
    # 22 animals: round(2.2) = 2 test, round(1.1) = 1 val; one food and one shape drawing: train
    assert data["counts"] == {"train": 19 + 1 + 1, "val": 1, "test": 2}
    again = import_openclipart(library, tmp_path / "other", max_pixels=1000)
    assert json.loads(again.read_text())["images"] == data["images"]  # fixed by the paths alone

    train = read_karpathy(out, data["image_root"], ["train"]).records
    assert len(train) == sum(len(e["sentences"]) for e in data["images"] if e["split"] == "train")
    test = read_karpathy_eval(out, data["image_root"], "test")
    assert len(test.images) == 2
    assert load_image(test.images[0]).getpixel((0, 0)) == (255, 255, 255)  # transparency onto white


def test_missing_library_names_the_install_command(tmp_path: Path) -> None:
    (tmp_path / "svg").mkdir()
    with pytest.raises(AssetMissing, match="apt-get .*openclipart-png"):
        import_openclipart(tmp_path, tmp_path / "k")
