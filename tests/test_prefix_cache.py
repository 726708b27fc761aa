"""train.cache_frozen_image: the image towers split after a block, the cache's plan and store, and a
run with the cache against the same run without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Dinov2Config

from conftest import TINY_VIT, eval_view_config
from unialign.config import parse_config
from unialign.model.towers import ImageTower, build_image_tower
from unialign.training.prefix_cache import FrozenPrefixCache
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


class CountingTower(torch.nn.Module):
    """A tower whose prefix doubles the pixels' mean per image and whose suffix adds 1; counts the
    images its prefix has seen."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward_prefix(self, pixels: torch.Tensor, n: int) -> torch.Tensor:
        self.seen += pixels.shape[0]
        return 2 * pixels.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 3, 4)

    def forward_suffix(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        return tokens + 1


def test_the_cache_computes_each_image_once_and_serves_it_after() -> None:
    cache, tower = FrozenPrefixCache(2), CountingTower()
    pixels = {i: torch.full((3, 2, 2), float(i)) for i in range(10)}

    def step(ids: list[int]) -> torch.Tensor:
        plan = cache.plan(torch.tensor(ids))
        return cache.tokens(tower, torch.stack([pixels[i] for i in ids]), plan["prefix_rows"], plan["prefix_fill"])

    # image 3 twice in one batch: one row, filled once
    plan = cache.plan(torch.tensor([3, 5, 3]))
    assert plan["prefix_rows"].tolist() == [0, 1, 0] and plan["prefix_fill"].tolist() == [0, 1]
    out = cache.tokens(tower, torch.stack([pixels[i] for i in (3, 5, 3)]), plan["prefix_rows"], plan["prefix_fill"])
    assert tower.seen == 2
    assert out[:, 0, 0].tolist() == [7.0, 11.0, 7.0]
    # seen images are read, new ones computed; the store grows past its first size
    out = step([5, 0, 1, 2, 4, 6, 7, 8, 9])
    assert tower.seen == 2 + 8 and cache.store.shape[0] >= 10
    assert out[:, 0, 0].tolist() == [2 * i + 1.0 for i in (5, 0, 1, 2, 4, 6, 7, 8, 9)]
    out = step([9, 3, 5])
    assert tower.seen == 10 and out[:, 0, 0].tolist() == [19.0, 7.0, 11.0]


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


@pytest.mark.parametrize("freeze", [1, "all"])
def test_a_run_with_the_cache_equals_the_run_without(small_world: Path, text_model_dir: Path,
                                                     teacher_checkpoint: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, freeze: int | str) -> None:
    """Three epochs over 16 un-augmented images: the cached run computes the frozen prefix of each
    image once (16 images, not 48) and ends with the same weights and losses as the online run."""
    seen: list[int] = []
    prefix = ImageTower.forward_prefix

    def counting(self: ImageTower, pixels: torch.Tensor, n: int) -> torch.Tensor:
        seen.append(pixels.shape[0])
        return prefix(self, pixels, n)

    monkeypatch.setattr(ImageTower, "forward_prefix", counting)
    finals = {}
    for cached in (False, True):
        raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint, epochs=3, cache_frozen_image=cached)
        raw["model"]["image"]["freeze_layers"] = freeze
        summary = train(parse_config(raw), tmp_path / str(cached))
        ckpt = torch.load(tmp_path / str(cached) / CHECKPOINT_DIR / FINAL, map_location="cpu", weights_only=True)
        finals[cached] = (summary["metrics"]["train/loss"], ckpt["state_dict"])
    assert sum(seen) == 16  # the online run never splits the tower; the cached one fills each image once
    assert finals[True][0] == pytest.approx(finals[False][0], rel=1e-4)
    for name, value in finals[False][1].items():
        torch.testing.assert_close(finals[True][1][name], value, rtol=1e-4, atol=1e-5, msg=name)
