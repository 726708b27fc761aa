"""Speed features (issue 5): cached teacher targets, torch.compile, bf16 on CPU, SDPA, no host syncs.

Cached and online targets are compared where they must agree exactly: the teacher sees the
student's pixels (``teacher.view: same``) and those pixels are the un-augmented eval view,
because ``data.train_scale: [1, 1]`` makes RandomResizedCrop take the whole (square) image
(with scale 1 only aspect ratio 1 fits a square, so after its 10 failed draws it falls back
to the full image) and ``data.hflip: false`` removes the flip. Crop-then-resize of the full
image equals the eval transform's resize, so both paths feed the teacher the same tensor.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import TINY_VIT, tiny_config_dict
from unialign.config import KarpathySource, parse_config
from unialign.data.records import read_source
from unialign.data import make_synthetic_karpathy, read_karpathy, write_webdataset_shards
from unialign.model.factory import create_tokenizer
from unialign.training.module import SMKETraining
from unialign.training.cache_build import build_teacher_cache
from unialign.training.datamodule import RetrievalDataModule
from unialign.training.teacher_cache import TeacherCache, TeacherCacheError
from unialign.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("speed_world")
    make_synthetic_karpathy(root, n_images=24, captions_per_image=2, image_size=32, seed=3,
                            split_counts={"train": 16, "val": 8})
    return root


def _raw(world: Path, text_model_dir: Path, teacher_checkpoint: Path, splits=("train",), **train_kw) -> dict:
    src = {"type": "karpathy", "path": str(world / "dataset_synthetic.json"), "images": str(world),
           "splits": list(splits)}
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [src], **train_kw)
    raw["data"]["train_scale"] = [1.0, 1.0]  # with hflip false (conftest): the student sees the eval view
    raw["loss"]["bank_size"] = 12  # fills and wraps within a few steps of 8 pairs
    return raw


def _records(world: Path, split: str = "train") -> list:
    """The training records with the image ids training uses (namespaced by source)."""
    return read_source(KarpathySource(path=world / "dataset_synthetic.json", images=world, splits=[split])).records


def _with_cache(raw: dict, cache: Path) -> dict:
    raw = copy.deepcopy(raw)
    raw["teacher"]["cache"] = str(cache)
    return raw


@pytest.fixture(scope="module")
def cache_dir(world, text_model_dir, teacher_checkpoint, tmp_path_factory) -> Path:
    cfg = parse_config(_raw(world, text_model_dir, teacher_checkpoint))
    # On the CPU in float32, like the online teacher these tests compare with (on a GPU machine the
    # pass would default to CUDA under bf16: 2e-3 apart, measured on an H100).
    return build_teacher_cache(cfg, tmp_path_factory.mktemp("cache") / "c", dtype="float32", batch_size=5,
                               num_workers=0, chunk_size=7, progress=False, device="cpu", precision="32")


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.kd: dict[int, float] = {}
        self.module = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.module = pl_module
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.kd[trainer.global_step] = float(trainer.callback_metrics["train/kd"])


def _batches(cfg, n: int) -> list[dict]:
    dm = RetrievalDataModule(cfg.data, create_tokenizer(cfg), cfg.model.text.max_length, cfg.train.batch_size,
                             cfg.seed)
    it = iter(dm.train_dataloader())
    return [dm.on_after_batch_transfer(next(it), 0) for _ in range(n)]  # what Lightning does after the copy


# ---------------------------------------------------------------------------------------
# Teacher cache


def test_cache_files_and_metadata(cache_dir, world):
    ids = np.load(cache_dir / "image_ids.npy")
    targets = np.load(cache_dir / "targets.npy", mmap_mode="r")
    train_ids = {r.image_id for r in _records(world)}
    assert ids.dtype == np.int64 and list(ids) == sorted(train_ids)  # one row per image, sorted for searchsorted
    assert targets.shape == (16, TINY_VIT["embed_dim"]) and targets.dtype == np.float32
    assert np.allclose(np.linalg.norm(targets, axis=1), 1, atol=1e-5)
    cache = TeacherCache.open(cache_dir)
    assert cache.meta["count"] == 16 and cache.meta["identity"]["teacher.block"] == -1
    assert len(cache.meta["identity"]["teacher.checkpoint (sha256)"]) == 64
    assert not (cache_dir / ".parts").exists()


def test_cached_targets_and_losses_equal_online(world, text_model_dir, teacher_checkpoint, cache_dir):
    raw = _raw(world, text_model_dir, teacher_checkpoint)
    cfg = parse_config(raw)
    torch.manual_seed(0)
    online = SMKETraining(cfg.model_dump(mode="json"))
    torch.manual_seed(0)
    cached = SMKETraining(parse_config(_with_cache(raw, cache_dir)).model_dump(mode="json"))
    assert cached.teacher is None and not any(k.startswith("teacher.") for k in cached.state_dict())
    # The teacher is built on its own RNG stream, so the student starts the same either way.
    for (name, a), b in zip(online.model.state_dict().items(), cached.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    online.train()
    cached.train()
    for i, batch in enumerate(_batches(cfg, 4)):  # the bank (12) fills and wraps over these steps
        target = cached.teacher_cache.lookup(batch["image_id"])
        torch.testing.assert_close(target, online.teacher(batch["image"]), rtol=0, atol=1e-5)
        torch.manual_seed(i)  # same dropout masks
        a = online.task(batch)
        torch.manual_seed(i)
        b = cached.task({**batch, "teacher_target": target})
        for key in ("loss", "itc", "itc_interm", "kd"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"step {i} {key}")
    torch.testing.assert_close(cached.kd.bank.targets, online.kd.bank.targets, rtol=0, atol=1e-5)


def test_training_with_cache_matches_online_run(world, text_model_dir, teacher_checkpoint, cache_dir, tmp_path):
    raw = _raw(world, text_model_dir, teacher_checkpoint, max_steps=3)
    online, cached = LossRecorder(), LossRecorder()
    train(parse_config(raw), tmp_path / "online", callbacks=[online])
    train(parse_config(_with_cache(raw, cache_dir)), tmp_path / "cached", callbacks=[cached])
    assert cached.module.teacher is None and cached.module.teacher_cache is not None
    assert sorted(cached.losses) == sorted(online.losses) == [1, 2, 3]
    for step in online.losses:
        assert cached.losses[step] == pytest.approx(online.losses[step], rel=1e-5), step
        assert cached.kd[step] == pytest.approx(online.kd[step], rel=1e-5), step


def test_missing_image_is_a_clear_error(world, text_model_dir, teacher_checkpoint, tmp_path):
    # A cache of the val images only, used to train on the train split.
    val_cfg = parse_config(_raw(world, text_model_dir, teacher_checkpoint, splits=("val",)))
    cache = build_teacher_cache(val_cfg, tmp_path / "val_cache", num_workers=0, progress=False)
    raw = _with_cache(_raw(world, text_model_dir, teacher_checkpoint, max_steps=1), cache)
    train_id = _records(world)[0].image_id
    opened = TeacherCache.open(cache, parse_config(raw))
    with pytest.raises(TeacherCacheError, match=rf"image id {train_id} is not in the teacher cache .*val_cache"):
        opened.lookup(torch.tensor([train_id]))
    with pytest.raises(TeacherCacheError, match=r"image id \d+ \(.*\.png\) of training source .* is not in the "
                                                r"teacher cache .*16 image\(s\) of that source missing"):
        train(parse_config(raw), tmp_path / "run")


def test_unreadable_images_are_left_out_of_the_cache_and_skipped_in_training(world, text_model_dir,
                                                                            teacher_checkpoint, tmp_path):
    copy_root = tmp_path / "world"
    shutil.copytree(world, copy_root)
    (copy_root / "images" / "000003.png").write_bytes(b"not a png")
    raw = _raw(copy_root, text_model_dir, teacher_checkpoint, max_steps=2)
    raw["data"]["max_bad_fraction"] = 0.5
    cache = build_teacher_cache(parse_config(raw), tmp_path / "cache", num_workers=0, progress=False)
    opened = TeacherCache.open(cache)
    assert opened.meta["count"] == 15 and opened.meta["skipped_unreadable"] == 1
    assert "000003.png" in (cache / "bad_samples.tsv").read_text()
    recorder = LossRecorder()
    summary = train(parse_config(_with_cache(raw, cache)), tmp_path / "run", callbacks=[recorder])
    assert sorted(recorder.losses) == [1, 2] and summary["global_step"] == 2


def test_metadata_mismatch_is_a_clear_error(world, text_model_dir, teacher_checkpoint, cache_dir, tmp_path):
    raw = _with_cache(_raw(world, text_model_dir, teacher_checkpoint), cache_dir)
    for key, value, message in [
        ("teacher.block", 1, r"teacher.block: cache has -1, config gives 1"),
        ("teacher.after_norm", True, r"teacher.after_norm: cache has False, config gives True"),
        ("data.image_size", 48, r"data.image_size: cache has 32, config gives 48"),
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
        SMKETraining(parse_config(_with_cache(raw, tmp_path / "empty")).model_dump(mode="json"))


def test_cache_build_resumes_and_covers_shards(world, text_model_dir, teacher_checkpoint, tmp_path):
    records = read_karpathy(world / "dataset_synthetic.json", world, ["train"]).records
    urls = write_webdataset_shards(records, tmp_path / "shards", pairs_per_shard=10)
    raw = _raw(world, text_model_dir, teacher_checkpoint)
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
    a.check_records(_records(world), "train")  # every image id training will ask for is there
    # Shard samples map to the same image ids at training time.
    shard_only = copy.deepcopy(raw)
    shard_only["data"]["train"] = shard_only["data"]["train"][1:]
    batch = _batches(parse_config(shard_only), 1)[0]
    assert a.lookup(batch["image_id"]).shape == (8, TINY_VIT["embed_dim"])
    # A finished cache is not rebuilt; a different teacher refuses to overwrite it.
    build_teacher_cache(cfg, tmp_path / "oneshot", **kw)
    other = copy.deepcopy(raw)
    other["teacher"]["block"] = 1
    with pytest.raises(TeacherCacheError, match="holds a teacher cache for another teacher"):
        build_teacher_cache(parse_config(other), tmp_path / "oneshot", **kw)


def test_cli_register(world, text_model_dir, teacher_checkpoint, tmp_path, capsys):
    import yaml

    from unialign.cli import build_parser

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw(world, text_model_dir, teacher_checkpoint)))
    args = build_parser().parse_args(["teacher-cache", "--config", str(config), "--output", str(tmp_path / "c"),
                              "--num-workers", "0", "--no-progress", "--set", "seed=1"])
    args.func(args)
    assert "16 images x 64 (float16)" in capsys.readouterr().out
    assert (tmp_path / "c" / "meta.json").is_file()


# ---------------------------------------------------------------------------------------
# torch.compile, bf16 on CPU


# Inductor's first compile of the four graphs (image tower, text tower, shared block, teacher;
# forward + backward) took 126 s on the 2-core CI VM with a cold compile cache (about 12 s once
# /tmp/torchinductor_$USER is warm), over this file's time budget. By default the test
# compiles with "aot_eager" (the same Dynamo capture and AOTAutograd graphs inductor receives,
# run with eager kernels); UNIALIGN_TEST_INDUCTOR=1 runs the real default backend as well.
_INDUCTOR_SKIP = pytest.mark.skipif(
    os.environ.get("UNIALIGN_TEST_INDUCTOR") != "1",
    reason="inductor compile takes ~2 min on a 2-core CPU with a cold cache (measured 126 s); "
           "set UNIALIGN_TEST_INDUCTOR=1 to run it")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=_INDUCTOR_SKIP)])
def test_compiled_step_matches_eager(world, text_model_dir, teacher_checkpoint, backend, monkeypatch):
    raw = _raw(world, text_model_dir, teacher_checkpoint)
    raw["data"]["pad_to_multiple_of"] = 1  # keep the two batches' caption lengths apart
    cfg = parse_config(raw)
    compiled_raw = copy.deepcopy(raw)
    compiled_raw["train"]["compile"] = True
    original = torch.nn.Module.compile
    compiled_parts = []

    def compile_with_backend(self, *args, **kwargs):
        compiled_parts.append(type(self).__name__)
        return original(self, *args, **{**kwargs, "backend": backend})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_backend)
    torch.manual_seed(0)
    eager = SMKETraining(cfg.model_dump(mode="json"))
    torch.manual_seed(0)
    compiled = SMKETraining(parse_config(compiled_raw).model_dump(mode="json"))
    assert compiled_parts == ["TimmImageTower", "TextTower", "SharedBlock", "TimmImageTower"]
    # nn.Module.compile is in place: same parameter names, so checkpoints are interchangeable.
    assert list(compiled.state_dict()) == list(eager.state_dict())
    eager.eval()  # no dropout: a compiled graph draws its random numbers differently
    compiled.eval()
    batches = _batches(cfg, 2)  # two caption lengths: the recompile for a new shape must work too
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    import torch._dynamo as dynamo

    dynamo.reset()
    start = time.perf_counter()
    try:
        out = [compiled.task(b) for b in batches]
        sum(o["loss"] for o in out).backward()
    except Exception as err:  # noqa: BLE001  # pragma: no cover - depends on the machine's compiler toolchain
        pytest.skip(f"torch.compile ({backend}) does not run here: {type(err).__name__}: {str(err)[:300]}")
    print(f"compile ({backend}) + 2 steps on CPU: {time.perf_counter() - start:.1f} s")
    ref = [eager.task(b) for b in batches]
    sum(r["loss"] for r in ref).backward()
    tol = {"rtol": 1e-5, "atol": 1e-6} if backend == "aot_eager" else {"rtol": 1e-4, "atol": 1e-5}
    for i, (o, r) in enumerate(zip(out, ref, strict=True)):
        for key in ("loss", "itc", "itc_interm", "kd"):
            torch.testing.assert_close(o[key], r[key], **tol, msg=f"batch {i} {key}")
    grads = dict(eager.model.named_parameters())
    for name, p in compiled.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_mixed_on_cpu(world, text_model_dir, teacher_checkpoint, tmp_path):
    recorder = LossRecorder()
    raw = _raw(world, text_model_dir, teacher_checkpoint, max_steps=2, precision="bf16-mixed")
    train(parse_config(raw), tmp_path / "run", callbacks=[recorder])
    assert sorted(recorder.losses) == [1, 2]
    assert all(np.isfinite(v) for v in [*recorder.losses.values(), *recorder.kd.values()])


def test_fused_adamw_only_where_lightning_allows_it(world, text_model_dir, teacher_checkpoint, tmp_path,
                                                   monkeypatch):
    raw = _raw(world, text_model_dir, teacher_checkpoint, max_steps=1, precision="bf16-mixed", grad_clip=1.0)
    # Fused AdamW (it runs on CPU too) + clipping under mixed precision is what Lightning refuses ...
    monkeypatch.setattr(SMKETraining, "fused_adamw", lambda self: True)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        train(parse_config(raw), tmp_path / "fused")
    monkeypatch.undo()
    # ... so the module picks fused AdamW only without that combination (on CUDA and on CPU).
    for precision, clip, fused in [("bf16-mixed", None, True), ("16-mixed", None, True), ("32-true", 1.0, True),
                                   ("16-mixed", 1.0, False), ("bf16-mixed", 1.0, False)]:
        cfg = copy.deepcopy(raw)
        cfg["train"].update(precision=precision, grad_clip=clip)
        module = SMKETraining(parse_config(cfg).model_dump(mode="json"))
        for device in (torch.device("cuda", 0), torch.device("cpu")):
            module._device = device  # what Lightning sets when it moves the module
            assert module.fused_adamw() is fused, (precision, clip, device)
    # A CPU run (bf16, no clipping) really steps with the fused kernel.
    raw["train"]["grad_clip"] = None
    probe = _OptimizerProbe()
    train(parse_config(raw), tmp_path / "cpu", callbacks=[probe])
    assert probe.fused is True


class _OptimizerProbe(Callback):
    fused: bool | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.fused = trainer.optimizers[0].defaults["fused"]


# ---------------------------------------------------------------------------------------
# SDPA everywhere, no host synchronisation in the step


def test_every_attention_uses_sdpa(world, text_model_dir, teacher_checkpoint, monkeypatch):
    import torch.nn.functional as F

    from unialign.config import TeacherConfig
    from unialign.model.teacher import Teacher

    cfg = parse_config(_raw(world, text_model_dir, teacher_checkpoint))
    module = SMKETraining(cfg.model_dump(mode="json")).eval()
    beit = Teacher(TeacherConfig(name="beitv2_base_patch16_224", pretrained=False, kwargs=TINY_VIT))
    fused = {name: m.fused_attn for part in (module, beit) for name, m in part.named_modules()
             if hasattr(m, "fused_attn")}
    assert len(fused) == 2 + 1 + 4 + 4 and all(fused.values()), fused  # image, shared, teacher, beit teacher
    assert module.model.text_tower.model.config._attn_implementation == "sdpa"
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    batch = _batches(cfg, 1)[0]
    with torch.no_grad():
        module.task(batch)
        beit(batch["image"])
    # image tower 2 + text tower 2 + shared block twice (image, text) + teacher 4 + BEiT teacher 4
    assert len(calls) == 2 + 2 + 2 + 4 + 4, len(calls)


class _SyncDetector:
    """Records Python-level reads of tensor values (what forces a host sync on a GPU)."""

    METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__")

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._saved: dict[str, object] = {}

    def __enter__(self) -> _SyncDetector:
        import traceback

        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(t, *a, __name=name, __original=original, **k):
                self.calls.append(f"Tensor.{__name} at {traceback.format_stack(limit=3)[0].strip()}")
                return __original(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def test_training_step_reads_no_device_values(world, text_model_dir, teacher_checkpoint, cache_dir):
    """No .item()/bool()/float() on tensors in the step (losses, memory bank, cache path), once the
    bank is full and wrapping (the path that used to read its pointer from the device)."""
    raw = _raw(world, text_model_dir, teacher_checkpoint)
    for variant in (raw, _with_cache(raw, cache_dir)):
        cfg = parse_config(variant)
        module = SMKETraining(cfg.model_dump(mode="json"))
        module.train()
        batches = _batches(cfg, 3)
        for batch in batches:
            if module.teacher_cache is not None:
                batch["teacher_target"] = module.teacher_cache.lookup(batch["image_id"])
        for batch in batches[:2]:
            module.task(batch)["loss"].backward()
        assert len(module.kd.bank) == 12 and int(module.kd.bank.ptr) == 4  # full, wrapped
        with _SyncDetector() as detector:
            module.task(batches[2])["loss"].backward()
        ours = [c for c in detector.calls if "transformers/masking_utils.py" not in c]
        assert ours == [], "\n".join(ours)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run by bench/gpu_suite.sh tests")
def test_training_step_has_no_cuda_sync(world, text_model_dir, teacher_checkpoint, cache_dir):
    """CUDA's own detector (``set_sync_debug_mode("error")``) over a whole bf16 step with fused
    AdamW: it also catches syncs inside ATen ops (nonzero, boolean indexing, ...), which the
    Python-level detector above cannot see."""
    raw = _raw(world, text_model_dir, teacher_checkpoint)
    for variant in (raw, _with_cache(raw, cache_dir)):
        cfg = parse_config(variant)
        module = SMKETraining(cfg.model_dump(mode="json")).cuda().train()
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, fused=True)
        batches = _batches(cfg, 3)
        for batch in batches:
            if module.teacher_cache is not None:
                batch["teacher_target"] = module.teacher_cache.lookup(batch["image_id"])
        batches = [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
        torch.cuda.synchronize()
        for i, batch in enumerate(batches):  # the last step runs with the bank full and wrapping
            torch.cuda.set_sync_debug_mode("error" if i == len(batches) - 1 else "default")
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = module.task(batch)["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss).item()

def test_text_tower_mask_needs_no_device_values(text_model_dir):
    from unialign.model.towers import TextTower

    tower = TextTower(str(text_model_dir), True, 2).eval()
    ids = torch.randint(5, 20, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    with _SyncDetector() as detector, torch.no_grad():
        tower(ids, mask)
    assert detector.calls == [], "\n".join(detector.calls)


def test_memory_bank_host_counters_follow_checkpoints():
    from unialign.losses import MemoryBank

    bank = MemoryBank(5, 2)
    bank.enqueue(torch.randn(7, 2), torch.arange(7))
    restored = MemoryBank(5, 2)
    restored.load_state_dict(bank.state_dict())
    assert len(restored) == 5 and restored._count_ptr() == (5, 2) == bank._count_ptr()
    for a, b in zip(bank.valid(), restored.valid(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Benchmarks: importable and runnable at CI size


@pytest.mark.parametrize("script, extra", [("train_step.py", ["--steps", "2"]), ("data.py", []), ("eval.py", [])])
def test_benchmarks_run_small(script, extra, tmp_path, monkeypatch):
    """In-process (no interpreter + torch import per script), at the --small sizes; then the
    Markdown table bench/perf_table.py makes of the result names every variant with its rate."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.json"
    result = _bench_module(script).main(["--small", "--json", str(out), *extra])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["small"] is True and result["device"] and result["baseline"]
    rows = {"train_step": "variants", "data": "results", "eval": "runs"}[result["bench"]]
    errors = {k: v["error"] for k, v in result[rows].items() if "error" in v}
    assert not errors, errors
    perf = _bench_module("perf_table.py")
    table = perf.render([out])
    assert "--small: a smoke run" in table
    for name, row in result[rows].items():
        shown = perf._num(row["total_s"], 2) if rows == "runs" else perf._num(row.get("pairs_per_s",
                                                                                     row.get("images_per_s")))
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {shown} |" in line, (name, shown, line)


def test_a_failing_measurement_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    """One broken path (here the device decoder) must not lose the figures of the others: they are
    in the JSON on disk, and the failure is a row of its own with its error."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    data = _bench_module("data.py")

    def broken(*args, **kwargs):
        raise RuntimeError("nvJPEG said no")

    monkeypatch.setattr(data, "unialign_device_decode", broken)
    out = tmp_path / "data.json"
    data.main(["--small", "--workdir", str(tmp_path / "w"), "--json", str(out)])
    res = json.loads(out.read_text())["results"]
    assert res["unialign_devdec_w0"] == {"error": "RuntimeError: nvJPEG said no"}
    assert res["unialign_w0"]["images_per_s"] > 0 and res["unialign_w2"]["images_per_s"] > 0
    assert "| unialign_devdec_w0 | - | - | error: RuntimeError: nvJPEG said no |" in \
        _bench_module("perf_table.py").render([out])


def test_train_run_kills_and_resumes_the_real_command(tmp_path, monkeypatch):
    """bench/train_run.py at --small: `unialign train` in a child, SIGKILLed after the step-4
    checkpoint, resumed from that checkpoint (not from 0) and run to step 16."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    out = tmp_path / "run.json"
    result = _bench_module("train_run.py").main(["--small", "--workdir", str(tmp_path / "w"), "--json", str(out)])
    run = result["runs"]["ddp"]
    assert run["ok"], run
    assert run["first"]["killed"] and run["first"]["returncode"] == -9
    assert 4 <= run["resumed_from_step"] < 16 and run["final_step"] == 16
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert "| ddp | True |" in _bench_module("perf_table.py").render([out])


def _bench_module(script: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", ROOT / "bench" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so a worker pool can pickle its functions by name
    spec.loader.exec_module(module)
    return module
