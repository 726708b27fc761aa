"""data.decode: device: header-only planning in the loader, batched JPEG decode + crop after the copy.

On CPU the device half runs torchvision's CPU JPEG decoder: the same code path as nvJPEG on CUDA.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import functional as TF
from transformers import AutoTokenizer

from conftest import tiny_config_dict
from unialign.config import ConfigError, DataConfig, ManifestSource, parse_config
from unialign.data import Collator, build_image_transform, load_image
from unialign.data.datasets import make_sample
from unialign.data.records import namespaced_id
from unialign.data import device_decode
from unialign.data.device_decode import DeviceDecodePlan, DeviceDecoder
from unialign.training.datamodule import RetrievalDataModule
from unialign.training.trainer import train

SIZE = 32
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _jpeg(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> bytes:
    low = rng.uniform(0, 255, (max(2, height // 8), max(2, width // 8), 3)).astype(np.uint8)
    img = Image.fromarray(low).resize((width, height), Image.BICUBIC).convert(mode)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=92)
    return out.getvalue()


def _png(rng: np.random.Generator) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    good = _jpeg(rng, 90, 60)
    return {"wide": good, "tall": _jpeg(rng, 48, 100), "gray": _jpeg(rng, 64, 64, "L"), "png": _png(rng),
            "cmyk": _jpeg(rng, 64, 48, "CMYK"), "truncated": good[: len(good) // 2]}


def _plan(hflip: bool = True) -> DeviceDecodePlan:
    host = build_image_transform(SIZE, MEAN, STD, train=True, scale=(0.5, 1.0), normalize=False)
    return DeviceDecodePlan((0.5, 1.0), hflip, host_transform=host)


def _batch(samples: list[dict], tokenizer) -> dict:
    return Collator(tokenizer, 16)(samples)


@pytest.fixture(scope="module")
def tokenizer(text_model_dir):
    return AutoTokenizer.from_pretrained(text_model_dir)


def test_plan_reads_headers_and_leaves_other_images_on_the_host(images) -> None:
    plan = _plan()
    for name in ("wide", "tall", "gray"):
        planned = make_sample(images[name], name, "a caption", 1, plan, None, seed=5)
        assert set(planned) == {"jpeg", "name", "crop", "flip", "caption", "image_id"}, name
        top, left, h, w = planned["crop"]
        width, height = Image.open(io.BytesIO(images[name])).size
        assert 0 <= top and 0 <= left and top + h <= height and left + w <= width
        assert 0.5 * width * height * 0.99 <= h * w <= width * height  # RandomResizedCrop's area range
        assert make_sample(images[name], name, "a caption", 1, plan, None, seed=5) == planned  # seeded
    for name in ("png", "cmyk"):  # decoded on the host (uint8), as with data.decode: host
        planned = make_sample(images[name], name, "a caption", 1, plan, None, seed=5)
        assert planned["image"].dtype == torch.uint8 and planned["image"].shape == (3, SIZE, SIZE), name
    flips = {make_sample(images["wide"], "w", "c", 1, plan, None, seed=s)["flip"] for s in range(20)}
    assert flips == {True, False}
    assert not any(make_sample(images["wide"], "w", "c", 1, _plan(hflip=False), None, seed=s)["flip"]
                   for s in range(20))
    # scale (1, 1): the whole image at every draw, as on the host (a 3:2 image is wider than 4:3)
    whole = DeviceDecodePlan((1.0, 1.0), False, host_transform=None)
    assert {make_sample(images["wide"], "w", "c", 1, whole, None, seed=s)["crop"] for s in range(5)} == {(0, 0, 60, 90)}


def test_device_half_decodes_crops_and_fills_every_slot(images, tokenizer) -> None:
    plan = _plan()
    names = ["wide", "png", "tall", "gray"]
    samples = [make_sample(images[n], n, f"caption {n}", i, plan, None, seed=10 + i) for i, n in enumerate(names)]
    batch = _batch(samples, tokenizer)
    assert batch["image"].shape == (1, 3, SIZE, SIZE) and batch["image_slots"] == [1]  # only the PNG
    out = DeviceDecoder(SIZE, "bicubic")(batch, torch.device("cpu"))
    assert "jpeg" not in out and out["image"].shape == (4, 3, SIZE, SIZE) and out["image"].dtype == torch.uint8
    assert torch.equal(out["image"][1], samples[1]["image"])  # the host-decoded PNG, in its slot
    for slot in (0, 2, 3):
        # Independent reference: PIL decode, then the same box, size and flip with torchvision.
        top, left, h, w = samples[slot]["crop"]
        pixels = TF.pil_to_tensor(load_image(images[names[slot]]))
        ref = TF.resized_crop(pixels, top, left, h, w, [SIZE, SIZE], interpolation=TF.InterpolationMode.BICUBIC,
                              antialias=True)
        ref = ref.flip(-1) if samples[slot]["flip"] else ref
        diff = (out["image"][slot].int() - ref.int()).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 8, (names[slot], diff.float().mean(), diff.max())
        # and the flip really mirrors: the unflipped reference is much further off
        other = ref.flip(-1)
        assert (out["image"][slot].int() - other.int()).abs().float().mean() > 2 * diff.float().mean() + 1


def test_undecodable_jpeg_is_dropped_and_counted(images, tokenizer) -> None:
    plan = _plan()
    names = ["wide", "truncated", "tall"]
    samples = [make_sample(images[n], n, f"caption {n}", i, plan, None, seed=i) for i, n in enumerate(names)]
    assert "jpeg" in samples[1]  # its header is fine: only decoding finds the problem
    batch = _batch(samples, tokenizer)
    batch["teacher_target"] = torch.arange(3.0)[:, None].repeat(1, 4)
    out = DeviceDecoder(SIZE, "bicubic")(batch, torch.device("cpu"))
    assert out["size"] == 2 and out["image"].shape[0] == 2 and out["n_skipped"] == 1
    assert out["captions"] == ["caption wide", "caption tall"]
    assert out["image_id"].tolist() == [0, 2] and out["teacher_target"][:, 0].tolist() == [0.0, 2.0]
    assert out["input_ids"].shape[0] == 2 and out["attention_mask"].shape[0] == 2
    assert out["skipped"][0][0] == "truncated" and "cannot decode" in out["skipped"][0][1]
    # a batch whose every image is bad ends empty, like a host batch of bad samples
    empty = DeviceDecoder(SIZE, "bicubic")(_batch([samples[1]], tokenizer), torch.device("cpu"))
    assert empty["size"] == 0 and empty["image"].shape[0] == 0



class _FakeStream:
    """Stands in for ``torch.cuda.Stream`` and logs what is done with it."""

    def __init__(self, name: str, log: list[tuple]) -> None:
        self.name, self.log = name, log

    def synchronize(self) -> None:
        self.log.append(("host waits for", self.name))

    def wait_stream(self, other: _FakeStream) -> None:
        self.log.append((self.name, "waits for", other.name))


def test_cuda_decode_runs_on_a_side_stream_the_training_stream_waits_for(images, tokenizer, monkeypatch) -> None:
    """nvJPEG allocates from the current stream but writes from a private, unordered one
    (pytorch/vision#9606), so the decode must not run with the training stream current.

    CI has no GPU: CUDA's stream API is replaced by loggers, the decode by torchvision's CPU
    decoder; the order of events is what is checked (the real thing runs in the next test)."""
    log: list[tuple] = []
    main = _FakeStream("training", log)
    current = [main]
    made_streams: list[_FakeStream] = []

    def new_stream(device: torch.device) -> _FakeStream:
        made_streams.append(_FakeStream("decode", log))
        return made_streams[-1]

    @contextmanager
    def use(stream: _FakeStream) -> Iterator[None]:
        current.append(stream)
        yield
        current.pop()

    def decode(raw, mode, device):
        log.append(("decode on", current[-1].name, "batch" if isinstance(raw, list) else "one"))
        return decode_jpeg(raw, mode=mode, device="cpu")

    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("host waits for", "device")))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: log.append(("kept for", stream.name)))
    monkeypatch.setattr(device_decode, "decode_jpeg", decode)

    plan = _plan()
    samples = [make_sample(images[n], n, f"caption {n}", i, plan, None, seed=i)
               for i, n in enumerate(["wide", "tall", "gray"])]
    decoder = DeviceDecoder(SIZE, "bicubic")
    out = decoder(_batch(samples, tokenizer), torch.device("cuda", 0))
    assert log == [("host waits for", "decode"), ("decode on", "decode", "batch"),
                   ("training", "waits for", "decode")] + [("kept for", "training")] * 3
    expected = DeviceDecoder(SIZE, "bicubic")(_batch(samples, tokenizer), torch.device("cpu"))
    assert torch.equal(out["image"], expected["image"])

    # A batch the decoder rejects: the device is drained before the per-image retries reuse memory.
    log.clear()
    broken = make_sample(images["truncated"], "truncated", "c", 9, plan, None, seed=9)
    out = decoder(_batch([samples[0], broken], tokenizer), torch.device("cuda", 0))
    assert log == [("host waits for", "decode"), ("decode on", "decode", "batch"), ("host waits for", "device"),
                   ("decode on", "decode", "one"), ("decode on", "decode", "one"), ("host waits for", "device"),
                   ("training", "waits for", "decode"), ("kept for", "training")]
    assert out["size"] == 1 and len(made_streams) == 1  # one decode stream per device, reused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG); run by bench/gpu_suite.sh tests")
def test_cuda_decode_leaves_memory_queued_kernels_still_read_alone(images, tokenizer) -> None:
    """The hazard itself (after pytorch/vision#9606's reproducer): fill blocks, queue a long
    kernel and then reads of them, free them, decode. A decoder handed one of those blocks
    overwrites it before the reads run, and a sum comes out wrong."""
    device = torch.device("cuda", torch.cuda.current_device())
    plan = _plan()
    samples = [make_sample(images["wide"], "wide", "c", i, plan, None, seed=i) for i in range(8)]
    decoder = DeviceDecoder(SIZE, "bicubic")
    height, width = 60, 90  # the decoded size of "wide": the blocks the decoder will ask for
    numel = 3 * height * width // 4  # as float32
    corrupted = 0
    for _ in range(50):
        victims = [torch.ones(numel, device=device) for _ in range(32)]
        torch.cuda.synchronize(device)
        torch.cuda._sleep(20_000_000)  # keeps the training stream busy while the decode runs
        sums = torch.stack([v.sum() for v in victims])
        del victims
        out = decoder(_batch(samples, tokenizer), device)
        torch.cuda.synchronize(device)
        corrupted += int((sums != numel).any())
        assert out["image"].shape == (8, 3, SIZE, SIZE)
    assert corrupted == 0

def _jpeg_world(root: Path, n: int = 32) -> Path:
    rng = np.random.default_rng(1)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        (root / "img" / f"{i}.jpg").write_bytes(_jpeg(rng, int(rng.integers(40, 120)), int(rng.integers(40, 120))))
        rows.append({"image": f"img/{i}.jpg", "caption": f"picture number {i}", "image_id": i})
    (root / "img" / "broken.jpg").write_bytes((root / "img" / "0.jpg").read_bytes()[:200])
    rows.append({"image": "img/broken.jpg", "caption": "a broken picture", "image_id": n})
    manifest = root / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_datamodule_device_decode_is_seeded_and_normalised(tmp_path, tokenizer) -> None:
    manifest = _jpeg_world(tmp_path)
    cfg = DataConfig(train=[ManifestSource(path=manifest, images=tmp_path)], image_size=SIZE, mean=MEAN, std=STD,
                     num_workers=0, decode="device")

    def epoch() -> list[dict]:
        dm = RetrievalDataModule(cfg, tokenizer, 16, batch_size=8, seed=4)
        return [dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]

    first, again = epoch(), epoch()
    assert len(first) == 33 // 8
    for a, b in zip(first, again, strict=True):
        assert a["image"].dtype == torch.float32 and a["image"].shape[1:] == (3, SIZE, SIZE)
        assert a["image"].shape[0] == a["size"] == len(a["captions"]) == a["input_ids"].shape[0]
        assert torch.equal(a["image"], b["image"]) and a["captions"] == b["captions"]
    assert sum(b["n_skipped"] for b in first) <= 1  # the broken file, if its batch was drawn


def test_training_runs_with_device_decode(tmp_path, text_model_dir, teacher_checkpoint) -> None:
    manifest = _jpeg_world(tmp_path)
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [{"type": "manifest", "path": str(manifest),
                                                                  "images": str(tmp_path)}], max_steps=3)
    raw["data"].update(decode="device", max_bad_fraction=0.2)  # the broken JPEG may be drawn
    summary = train(parse_config(raw), tmp_path / "run")
    assert summary["global_step"] == 3 and np.isfinite(summary["metrics"]["train/loss"])
    assert summary["samples_seen"] == 24 and summary["samples_bad"] <= 1


def test_device_decode_config_conflicts_are_rejected(tmp_path, text_model_dir, teacher_checkpoint) -> None:
    manifest = _jpeg_world(tmp_path, 2)
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [{"type": "manifest", "path": str(manifest),
                                                                  "images": str(tmp_path)}])
    raw["data"].update(decode="device", normalize_on_device=False)
    with pytest.raises(ConfigError, match="data.decode: device needs data.normalize_on_device: true"):
        parse_config(raw)
    raw["data"]["normalize_on_device"] = True
    raw["teacher"]["view"] = "separate"
    with pytest.raises(ConfigError, match="teacher.view: separate needs data.decode: host"):
        parse_config(raw)


def test_teacher_cache_pass_decodes_on_the_device(tmp_path, text_model_dir, teacher_checkpoint) -> None:
    from unialign.data.transforms import PixelNormalizer
    from unialign.model.teacher import Teacher
    from unialign.training.cache_build import build_teacher_cache
    from unialign.training.teacher_cache import TeacherCache, TeacherCacheError

    manifest = _jpeg_world(tmp_path, 12)
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [{"type": "manifest", "path": str(manifest),
                                                                  "images": str(tmp_path)}])
    raw["data"]["decode"] = "device"
    cfg = parse_config(raw)
    kw = {"num_workers": 0, "progress": False, "dtype": "float32", "batch_size": 5, "chunk_size": 5, "precision": "32"}
    cache = TeacherCache.open(build_teacher_cache(cfg, tmp_path / "device", **kw))
    assert cache.meta["decode"] == "device" and cache.meta["count"] == 12 and cache.meta["skipped_unreadable"] == 1
    assert "broken.jpg" in (tmp_path / "device" / "bad_samples.tsv").read_text()

    # Independent reference for the device's eval view: torchvision's decoder, a square resize, the teacher.
    teacher = Teacher(cfg.teacher).eval()
    normalize = PixelNormalizer(cfg.data.mean, cfg.data.std)
    pixels = torch.stack([TF.resize(decode_jpeg(torch.frombuffer(bytearray((tmp_path / "img" / f"{i}.jpg")
                                                                            .read_bytes()), dtype=torch.uint8)),
                                    [SIZE, SIZE], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
                          for i in range(12)])
    with torch.no_grad():
        expected = teacher(normalize(pixels))
    ids = torch.tensor([namespaced_id(manifest.name, i) for i in range(12)])
    got = cache.lookup(ids)
    if torch.cuda.is_available():  # nvJPEG's IDCT and TF32 convolutions: close, not equal, to the CPU reference
        assert torch.nn.functional.cosine_similarity(got, expected).min() > 0.999
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # The host-decoded cache of the same images differs only by the decoders' rounding.
    raw["data"]["decode"] = "host"
    host = TeacherCache.open(build_teacher_cache(parse_config(raw), tmp_path / "host", **kw))
    assert host.meta["decode"] == "host"
    cosine = (host.lookup(ids) * cache.lookup(ids)).sum(-1)
    assert cosine.min() > 0.99 and not torch.equal(host.lookup(ids), cache.lookup(ids))

    # An unfinished build is never continued with the other decoder (its parts would mix both).
    build_teacher_cache(parse_config(raw), tmp_path / "half", max_units=1, **kw)
    with pytest.raises(TeacherCacheError, match="another teacher, view, dtype, decoder or data"):
        build_teacher_cache(cfg, tmp_path / "half", **kw)
