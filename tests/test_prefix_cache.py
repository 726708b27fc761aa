"""train.cache_frozen_image: the image towers split after a block, the cache's plan and store, and a
run with the cache against the same run without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Dinov2Config

from conftest import TINY_VIT, eval_view_config
from unialign.config import parse_config
from unialign.model.towers import ImageTower, TextTower, build_image_tower
from unialign.training.prefix_cache import FrozenPrefixCache, shared_prefix_caches
from unialign.training.trainer import CHECKPOINT_DIR, FINAL, train


def _towers() -> dict[str, ImageTower]:
    torch.manual_seed(0)
    dinov2 = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8, layerscale_value=0.5)
    return {
        "timm": build_image_tower("timm", "vit_small_patch16_224", pretrained=False, layers=3, kwargs=TINY_VIT),
        "hf": build_image_tower("hf", "dinov2", pretrained=False, hf_config=dinov2.to_dict(), keep_final_norm=True),
        "data2vec2": build_image_tower("data2vec2", "d2v2", pretrained=False, layers=3,
                                       kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4,
                                               "num_heads": 2}),
    }


@pytest.mark.parametrize("backend", ["timm", "hf", "data2vec2"])
def test_a_tower_split_after_any_block_is_the_whole_forward(backend: str) -> None:
    tower = _towers()[backend].eval()
    pixels = torch.randn(2, 3, 32, 32)
    whole = tower(pixels)
    assert tower.num_blocks == 3
    for n in range(tower.num_blocks + 1):
        prefix = tower.forward_prefix(pixels, n)
        assert prefix.shape == whole.shape
        torch.testing.assert_close(tower.forward_suffix(prefix, n), whole, rtol=1e-5, atol=1e-5)
    # the split is real: the prefix after 1 block is neither the input side nor the whole
    assert not torch.allclose(tower.forward_prefix(pixels, 1), tower.forward_prefix(pixels, 0))


def test_the_cache_computes_each_input_once_and_serves_it_after() -> None:
    """Images: one length. Each call of `prefix` is counted; the stored value of input i is 2i."""
    cache, computed = FrozenPrefixCache(2), []

    def step(ids: list[int]) -> torch.Tensor:
        rows, fill = cache.plan(ids)

        def prefix(idx: torch.Tensor) -> torch.Tensor:
            computed.extend(ids[i] for i in idx.tolist())
            return torch.tensor([2.0 * ids[i] for i in idx.tolist()])[:, None, None].expand(-1, 3, 4)

        return cache.read(prefix, rows, fill)[:, 0, 0]

    # image 3 twice in one batch: one row, filled once
    rows, fill = cache.plan([3, 5, 3])
    assert rows.tolist() == [0, 1, 0] and fill.tolist() == [0, 1]
    cache.rows.clear()
    assert step([3, 5, 3]).tolist() == [6.0, 10.0, 6.0] and computed == [3, 5]
    # seen inputs are read, new ones computed; the store grows past its first size
    assert step([5, 0, 1, 2, 4, 6, 7, 8, 9]).tolist() == [2.0 * i for i in (5, 0, 1, 2, 4, 6, 7, 8, 9)]
    assert computed == [3, 5, 0, 1, 2, 4, 6, 7, 8, 9] and cache.store.shape[0] >= 10
    assert step([9, 3, 5]).tolist() == [18.0, 6.0, 10.0] and len(computed) == 10


def test_captions_of_different_lengths_share_one_store() -> None:
    """Text: entries up to `length` tokens; a batch reads as many as it has, zeros past a caption's end."""
    cache = FrozenPrefixCache(1, length=6)
    rows, fill = cache.plan([(1, 2), (3, 4, 5, 6)])
    cache.read(lambda i: torch.ones(len(i), 4, 2), rows, fill, 4)
    rows, fill = cache.plan([(1, 2), (7,)])
    assert fill.tolist() == [1]
    out = cache.read(lambda i: torch.full((len(i), 2, 2), 5.0), rows, fill, 6)
    assert out.shape == (2, 6, 2)
    assert out[0, :4].eq(1).all() and out[0, 4:].eq(0).all()
    assert out[1, :2].eq(5).all() and out[1, 2:].eq(0).all()


def test_the_text_tower_split_after_any_layer_is_the_whole_forward(text_model_dir: Path) -> None:
    tower = TextTower(str(text_model_dir), pretrained=True, layers=3).eval()
    ids = torch.randint(5, 20, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:], mask[2, 2:] = 0, 0
    whole = tower(ids, mask)
    for n in range(4):
        out = tower.forward_suffix(tower.forward_prefix(ids, mask, n), mask, n)
        torch.testing.assert_close(out[mask.bool()], whole[mask.bool()], rtol=1e-5, atol=1e-5)


def test_config_rejects_the_cache_where_it_would_be_wrong_or_useless(small_world: Path, text_model_dir: Path,
                                                                     teacher_checkpoint: Path) -> None:
    raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint, cache_frozen_image=True)
    with pytest.raises(ValueError, match="freeze_layers is 0"):
        parse_config(raw)
    raw["model"]["image"]["freeze_layers"] = 1
    parse_config(raw)
    raw["data"]["hflip"] = True
    with pytest.raises(ValueError, match=r"training views are augmented .*data.hflip True"):
        parse_config(raw)
    raw["data"]["hflip"] = False
    raw["train"]["cache_frozen_text"] = True
    with pytest.raises(ValueError, match=r"train.cache_frozen_text: model.text.freeze_layers is 0"):
        parse_config(raw)


@pytest.mark.parametrize("freeze", [1, "all"])
def test_a_run_with_the_caches_equals_the_run_without(small_world: Path, text_model_dir: Path,
                                                      teacher_checkpoint: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, freeze: int | str) -> None:
    """Three epochs over 16 un-augmented images with 2 captions each: the cached run computes the
    frozen prefix of each image once (16 images, not 48) and of each distinct caption once, and ends
    with the same weights and losses as the online run."""
    seen: dict[str, list[int]] = {"image": [], "text": []}
    image_prefix, text_prefix = ImageTower.forward_prefix, TextTower.forward_prefix

    def image_counting(self: ImageTower, pixels: torch.Tensor, n: int) -> torch.Tensor:
        seen["image"].append(pixels.shape[0])
        return image_prefix(self, pixels, n)

    def text_counting(self: TextTower, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        seen["text"].append(ids.shape[0])
        return text_prefix(self, ids, mask, n)

    monkeypatch.setattr(ImageTower, "forward_prefix", image_counting)
    monkeypatch.setattr(TextTower, "forward_prefix", text_counting)
    finals = {}
    for cached in (False, True):
        raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint, epochs=3, cache_frozen_image=cached,
                               cache_frozen_text=cached)
        raw["data"]["cache_images"] = cached
        raw["model"]["image"]["freeze_layers"] = freeze
        raw["model"]["text"]["freeze_layers"] = freeze
        summary = train(parse_config(raw), tmp_path / str(cached))
        ckpt = torch.load(tmp_path / str(cached) / CHECKPOINT_DIR / FINAL, map_location="cpu", weights_only=True)
        finals[cached] = (summary["metrics"]["train/loss"], ckpt["state_dict"])
    # the online run never splits a tower; the cached one fills each image and each caption once
    captions = {r["raw"] for im in json.loads((small_world / "dataset_synthetic.json").read_text())["images"]
                if im["split"] == "train" for r in im["sentences"]}
    assert sum(seen["image"]) == 16 and sum(seen["text"]) == len(captions)
    assert finals[True][0] == pytest.approx(finals[False][0], rel=1e-4)
    for name, value in finals[False][1].items():
        torch.testing.assert_close(finals[True][1][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_runs_with_the_same_frozen_prefix_share_its_cache(small_world: Path, text_model_dir: Path,
                                                        teacher_checkpoint: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Within shared_prefix_caches, a run without KD after a run with it (same data, same frozen blocks)
    computes no frozen block and ends as it ends alone; a run with another frozen prefix (one more
    block frozen) or other data (the val split) fills its own cache; outside it nothing is shared."""
    seen: list[int] = []
    image_prefix = ImageTower.forward_prefix

    def counting(self: ImageTower, pixels: torch.Tensor, n: int) -> torch.Tensor:
        seen.append(pixels.shape[0])
        return image_prefix(self, pixels, n)

    monkeypatch.setattr(ImageTower, "forward_prefix", counting)

    def run(name: str, kd: bool = True, freeze: int = 1, splits: tuple[str, ...] = ("train",)) -> dict:
        raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint, splits, epochs=2,
                               cache_frozen_image=True)
        raw["model"]["image"]["freeze_layers"] = freeze
        if not kd:
            raw["teacher"]["enabled"], raw["loss"]["kd"] = False, "none"
        seen.clear()
        train(parse_config(raw), tmp_path / name)
        ckpt = torch.load(tmp_path / name / CHECKPOINT_DIR / FINAL, map_location="cpu", weights_only=True)
        return {"filled": sum(seen), "state": ckpt["state_dict"]}

    alone = run("no_kd_alone", kd=False)
    assert alone["filled"] == 16 and run("kd_alone")["filled"] == 16
    with shared_prefix_caches():
        assert run("kd")["filled"] == 16
        shared = run("no_kd", kd=False)
        assert run("kd_freeze_2", freeze=2)["filled"] == 16
        # the val images are numbered 0-7 as the first train images are: keyed by id alone, nothing is filled
        assert run("kd_val", splits=("val",))["filled"] == 8
    assert shared["filled"] == 0
    for name, value in alone["state"].items():
        torch.testing.assert_close(shared["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_cached_images_are_decoded_once_and_equal_the_fresh_ones(small_world: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """data.cache_images: the un-augmented view of each image is decoded in the first epoch only, and
    every later epoch serves the same tensor as a fresh decode would."""
    import unialign.data.datasets as datasets
    from unialign.data.records import read_karpathy
    from unialign.data.transforms import build_image_transform

    records = read_karpathy(small_world / "dataset_synthetic.json", small_world, ["train"]).records
    transform = build_image_transform(32, (0.5,) * 3, (0.5,) * 3, train=True, scale=(1.0, 1.0), hflip=False,
                                      normalize=False)
    loads: list[str] = []
    real_load = datasets.load_image

    def counting(image, name):
        loads.append(name)
        return real_load(image, name=name)

    monkeypatch.setattr(datasets, "load_image", counting)
    kept = datasets.PairDataset(records, transform, keep_images=True)
    fresh = datasets.PairDataset(records, transform)
    for epoch in range(3):
        kept.set_epoch(epoch)
        fresh.set_epoch(epoch)
        for i in range(len(records)):
            a, b = kept[i], fresh[i]
            assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] and a["index"] == i
    images = {r.image for r in records}
    assert len(loads) == len(images) + 3 * len(records)  # kept: each image once; fresh: every sample, every epoch
    with pytest.raises(ValueError, match="data.cache_images needs un-augmented views"):
        parse_config({"data": {"train": [{"type": "karpathy", "path": "x.json", "images": "."}], "cache_images": True}})
