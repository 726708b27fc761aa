"""The teacher cache (issue 5): building it (files, metadata, resume, shards, the command line),
reading it, its clear errors (missing images, another teacher or view), and training with it,
which gives the same targets and losses as the online teacher.

Cached and online targets are compared where they must agree exactly: the teacher sees the
student's pixels (``teacher.view: same``) and those pixels are the un-augmented eval view
(conftest.eval_view_config says why).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import TINY_VIT, eval_view_config, train_batches, with_teacher_cache
from unialign.config import KarpathySource, parse_config
from unialign.data import read_karpathy, write_webdataset_shards
from unialign.data.records import read_source
from unialign.training.cache_build import build_teacher_cache
from unialign.training.module import SMKETraining
from unialign.training.teacher_cache import TeacherCache, TeacherCacheError
from unialign.training.trainer import train


def _records(world: Path, split: str = "train") -> list:
    """The training records with the image ids training uses (namespaced by source)."""
    return read_source(KarpathySource(path=world / "dataset_synthetic.json", images=world, splits=[split])).records



class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.kd: dict[int, float] = {}
        self.module = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.module = pl_module
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.kd[trainer.global_step] = float(trainer.callback_metrics["train/kd"])



# ---------------------------------------------------------------------------------------
# Teacher cache


def test_cache_files_and_metadata(teacher_cache_dir, small_world):
    ids = np.load(teacher_cache_dir / "image_ids.npy")
    targets = np.load(teacher_cache_dir / "targets.npy", mmap_mode="r")
    train_ids = {r.image_id for r in _records(small_world)}
    assert ids.dtype == np.int64 and list(ids) == sorted(train_ids)  # one row per image, sorted for searchsorted
    assert targets.shape == (16, TINY_VIT["embed_dim"]) and targets.dtype == np.float32
    assert np.allclose(np.linalg.norm(targets, axis=1), 1, atol=1e-5)
    cache = TeacherCache.open(teacher_cache_dir)
    assert cache.meta["count"] == 16 and cache.meta["identity"]["teacher.block"] == -1
    assert len(cache.meta["identity"]["teacher.checkpoint (sha256)"]) == 64
    assert not (teacher_cache_dir / ".parts").exists()


def test_cached_targets_and_losses_equal_online(small_world, text_model_dir, teacher_checkpoint, teacher_cache_dir):
    raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint)
    cfg = parse_config(raw)
    torch.manual_seed(0)
    online = SMKETraining(cfg.model_dump(mode="json"))
    torch.manual_seed(0)
    cached = SMKETraining(parse_config(with_teacher_cache(raw, teacher_cache_dir)).model_dump(mode="json"))
    assert cached.teacher is None and not any(k.startswith("teacher.") for k in cached.state_dict())
    # The teacher is built on its own RNG stream, so the student starts the same either way.
    for (name, a), b in zip(online.model.state_dict().items(), cached.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    online.train()
    cached.train()
    for i, batch in enumerate(train_batches(cfg, 4)):  # the bank (12) fills and wraps over these steps
        target = cached.teacher_cache.lookup(batch["image_id"])
        torch.testing.assert_close(target, online.teacher(batch["image"]), rtol=0, atol=1e-5)
        torch.manual_seed(i)  # same dropout masks
        a = online.task(batch)
        torch.manual_seed(i)
        b = cached.task({**batch, "teacher_target": target})
        for key in ("loss", "itc", "itc_interm", "kd"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"step {i} {key}")
    torch.testing.assert_close(cached.kd.bank.targets, online.kd.bank.targets, rtol=0, atol=1e-5)


def test_training_with_cache_matches_online_run(small_world, text_model_dir, teacher_checkpoint, teacher_cache_dir,
                                                tmp_path):
    raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint, max_steps=3)
    online, cached = LossRecorder(), LossRecorder()
    train(parse_config(raw), tmp_path / "online", callbacks=[online])
    train(parse_config(with_teacher_cache(raw, teacher_cache_dir)), tmp_path / "cached", callbacks=[cached])
    assert cached.module.teacher is None and cached.module.teacher_cache is not None
    assert sorted(cached.losses) == sorted(online.losses) == [1, 2, 3]
    for step in online.losses:
        assert cached.losses[step] == pytest.approx(online.losses[step], rel=1e-5), step
        assert cached.kd[step] == pytest.approx(online.kd[step], rel=1e-5), step


def test_missing_image_is_a_clear_error(small_world, text_model_dir, teacher_checkpoint, tmp_path):
    # A cache of the val images only, used to train on the train split.
    val_cfg = parse_config(eval_view_config(small_world, text_model_dir, teacher_checkpoint, splits=("val",)))
    cache = build_teacher_cache(val_cfg, tmp_path / "val_cache", num_workers=0, progress=False)
    raw = with_teacher_cache(eval_view_config(small_world, text_model_dir, teacher_checkpoint, max_steps=1), cache)
    train_id = _records(small_world)[0].image_id
    opened = TeacherCache.open(cache, parse_config(raw))
    with pytest.raises(TeacherCacheError, match=rf"image id {train_id} is not in the teacher cache .*val_cache"):
        opened.lookup(torch.tensor([train_id]))
    with pytest.raises(TeacherCacheError, match=r"image id \d+ \(.*\.png\) of training source .* is not in the "
                                                r"teacher cache .*16 image\(s\) of that source missing"):
        train(parse_config(raw), tmp_path / "run")


def test_unreadable_images_are_left_out_of_the_cache_and_skipped_in_training(small_world, text_model_dir,
                                                                            teacher_checkpoint, tmp_path):
    copy_root = tmp_path / "world"
    shutil.copytree(small_world, copy_root)
    (copy_root / "images" / "000003.png").write_bytes(b"not a png")
    raw = eval_view_config(copy_root, text_model_dir, teacher_checkpoint, max_steps=2)
    raw["data"]["max_bad_fraction"] = 0.5
    cache = build_teacher_cache(parse_config(raw), tmp_path / "cache", num_workers=0, progress=False)
    opened = TeacherCache.open(cache)
    assert opened.meta["count"] == 15 and opened.meta["skipped_unreadable"] == 1
    assert "000003.png" in (cache / "bad_samples.tsv").read_text()
    recorder = LossRecorder()
    summary = train(parse_config(with_teacher_cache(raw, cache)), tmp_path / "run", callbacks=[recorder])
    assert sorted(recorder.losses) == [1, 2] and summary["global_step"] == 2


def test_teacher_image_size_is_the_teachers_own_view(small_world, text_model_dir, teacher_checkpoint,
                                                     teacher_cache_dir, tmp_path):
    """teacher.image_size: the cache holds the teacher's output for the image resized to that size (an
    independent forward on PIL-resized pixels), not for the student's smaller view."""
    from PIL import Image

    from unialign.model.teacher import Teacher

    raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint)
    raw["teacher"]["kwargs"] = {**TINY_VIT, "dynamic_img_size": True}
    raw["teacher"]["image_size"] = 48  # the student sees 32 px
    # Online with view: same the teacher would get the student's 32-px pixels: refused.
    with pytest.raises(ValueError, match=r"teacher.image_size 48 differs from data.image_size 32.*teacher.cache"):
        parse_config(raw)
    separate = copy.deepcopy(raw)
    separate["teacher"]["view"] = "separate"
    separate_cfg = parse_config(separate)
    teacher = Teacher(separate_cfg.teacher)
    image = Image.open(_records(small_world)[0].image).convert("RGB")
    assert teacher.train_transform(separate_cfg.data, separate_cfg.teacher_image_size)(image).shape == (3, 48, 48)

    raw["teacher"]["cache"] = "auto"
    cache = TeacherCache.open(build_teacher_cache(parse_config(raw), tmp_path / "cache", num_workers=0,
                                                  progress=False))
    assert cache.meta["identity"]["view size"] == 48
    small = TeacherCache.open(teacher_cache_dir)  # the same teacher weights at the student's 32 px
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for record in _records(small_world)[:4]:
        pixels = Image.open(record.image).convert("RGB").resize((48, 48), Image.Resampling.BICUBIC)
        x = (torch.from_numpy(np.asarray(pixels).copy()).permute(2, 0, 1).float() / 255 - mean) / std
        expected = teacher(x[None])[0]
        got = cache.lookup([record.image_id])[0]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        assert (small.lookup([record.image_id])[0] - expected).abs().max() > 1e-2  # the size made a difference


def test_metadata_mismatch_is_a_clear_error(small_world, text_model_dir, teacher_checkpoint, teacher_cache_dir,
                                            tmp_path):
    raw = with_teacher_cache(eval_view_config(small_world, text_model_dir, teacher_checkpoint), teacher_cache_dir)
    for key, value, message in [
        ("teacher.block", 1, r"teacher.block: cache has -1, config gives 1"),
        ("teacher.after_norm", True, r"teacher.after_norm: cache has False, config gives True"),
        ("data.image_size", 48, r"view size: cache has 32, config gives 48"),
        ("data.mean", [0.5, 0.5, 0.5], r"view mean: cache has \[0.485"),
    ]:
        bad = copy.deepcopy(raw)
        section, name = key.split(".")
        bad[section][name] = value
        with pytest.raises(TeacherCacheError, match=rf"built for another teacher or view(.|\n)*{message}"):
            SMKETraining(parse_config(bad).model_dump(mode="json"))
    # Other teacher weights (a different checkpoint file) are caught by its sha256.
    other = tmp_path / "other_teacher.pth"
    state = torch.load(teacher_checkpoint)
    state["cls_token"] = state["cls_token"] + 1
    torch.save(state, other)
    bad = copy.deepcopy(raw)
    bad["teacher"]["checkpoint"] = str(other)
    with pytest.raises(TeacherCacheError, match=r"teacher.checkpoint \(sha256\): cache has '[0-9a-f]{64}'"):
        SMKETraining(parse_config(bad).model_dump(mode="json"))
    # A directory that is not a finished cache.
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherCacheError, match=r"is not a teacher cache: .*meta.json is missing"):
        SMKETraining(parse_config(with_teacher_cache(raw, tmp_path / "empty")).model_dump(mode="json"))


def test_cache_build_resumes_and_covers_shards(small_world, text_model_dir, teacher_checkpoint, tmp_path):
    records = read_karpathy(small_world / "dataset_synthetic.json", small_world, ["train"]).records
    urls = write_webdataset_shards(records, tmp_path / "shards", pairs_per_shard=10)
    raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint)
    # The shards hold the Karpathy images again under the same ids: one id namespace says so.
    raw["data"]["train"].append({"type": "webdataset", "urls": urls, "size": len(records),
                                 "id_namespace": "dataset_synthetic.json"})
    cfg = parse_config(raw)
    kw = {"dtype": "float16", "batch_size": 4, "num_workers": 0, "chunk_size": 5, "progress": False}
    # Karpathy: 16 images in 4 chunks; shards: 4 (same images again, ids from their .json).
    build_teacher_cache(cfg, tmp_path / "resumed", max_units=3, **kw)  # "interrupted" after 3 units
    assert len(list((tmp_path / "resumed" / ".parts").glob("*.npz"))) == 3
    with pytest.raises(TeacherCacheError, match="unfinished build"):
        TeacherCache.open(tmp_path / "resumed")
    build_teacher_cache(cfg, tmp_path / "resumed", **kw)
    build_teacher_cache(cfg, tmp_path / "oneshot", **kw)
    a, b = TeacherCache.open(tmp_path / "resumed", cfg), TeacherCache.open(tmp_path / "oneshot", cfg)
    assert a.meta["count"] == 16 and a.meta["duplicate_ids_dropped"] == 16
    assert np.array_equal(a.ids, b.ids) and np.array_equal(np.asarray(a.targets), np.asarray(b.targets))
    assert a.targets.dtype == np.float16
    a.check_records(_records(small_world), "train")  # every image id training will ask for is there
    # Shard samples map to the same image ids at training time.
    shard_only = copy.deepcopy(raw)
    shard_only["data"]["train"] = shard_only["data"]["train"][1:]
    batch = train_batches(parse_config(shard_only), 1)[0]
    assert a.lookup(batch["image_id"]).shape == (8, TINY_VIT["embed_dim"])
    # A finished cache is not rebuilt; a different teacher refuses to overwrite it.
    build_teacher_cache(cfg, tmp_path / "oneshot", **kw)
    other = copy.deepcopy(raw)
    other["teacher"]["block"] = 1
    with pytest.raises(TeacherCacheError, match="holds a teacher cache for another teacher"):
        build_teacher_cache(parse_config(other), tmp_path / "oneshot", **kw)


def test_cli_register(small_world, text_model_dir, teacher_checkpoint, tmp_path, capsys):
    import yaml

    from unialign.cli import build_parser

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(eval_view_config(small_world, text_model_dir, teacher_checkpoint)))
    args = build_parser().parse_args(["teacher-cache", "--config", str(config), "--output", str(tmp_path / "c"),
                              "--num-workers", "0", "--no-progress", "--set", "seed=1"])
    args.func(args)
    assert "16 images x 64 (float16)" in capsys.readouterr().out
    assert (tmp_path / "c" / "meta.json").is_file()


def test_the_teacher_pass_fills_the_students_shared_frozen_prefix(small_world, text_model_dir, teacher_checkpoint,
                                                                  tmp_path, monkeypatch):
    """The student's frozen block is the teacher's first (same checkpoint) and sees the same pixels: within
    shared_prefix_caches the teacher's pass computes that block's output once for both, and the cache and
    the trained model are those of the run without sharing."""
    from unialign.model.towers import ImageTower
    from unialign.training.prefix_cache import shared_prefix_caches
    from unialign.training.trainer import CHECKPOINT_DIR, FINAL

    calls: list[int] = []
    forward_prefix = ImageTower.forward_prefix
    monkeypatch.setattr(ImageTower, "forward_prefix", lambda self, pixels, n: calls.append(len(pixels)) or
                        forward_prefix(self, pixels, n))
    raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint, epochs=2, cache_frozen_image=True)
    raw["model"]["image"].update(checkpoint=str(teacher_checkpoint), freeze_layers=1)

    def run(name: str) -> tuple[list[int], np.ndarray, dict]:
        counts = []
        calls.clear()
        cache = build_teacher_cache(parse_config(raw), tmp_path / f"cache_{name}", batch_size=8, progress=False)
        counts.append(sum(calls))
        calls.clear()
        train(parse_config(with_teacher_cache(raw, cache)), tmp_path / name)
        counts.append(sum(calls))
        state = torch.load(tmp_path / name / CHECKPOINT_DIR / FINAL, map_location="cpu", weights_only=True)
        ids = sorted({r.image_id for r in _records(small_world)})
        return counts, np.asarray(TeacherCache.open(cache).lookup(ids)), state["state_dict"]

    alone = run("alone")
    with shared_prefix_caches():
        shared = run("shared")
    assert alone[0] == [0, 16] and shared[0] == [16, 0]  # (teacher pass, student's training)
    np.testing.assert_allclose(shared[1], alone[1], rtol=1e-5, atol=1e-6)
    for name, value in alone[2].items():
        torch.testing.assert_close(shared[2][name], value, rtol=1e-4, atol=1e-5, msg=name)
