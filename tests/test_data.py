"""Tests of the data pipeline: readers, decoding, augmentation, datasets, batching, resume."""

from __future__ import annotations

import io
import json
import string
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from PIL import Image
from torch.utils.data import DataLoader
from transformers import BertTokenizerFast

from unialign.config import DataConfig, KarpathySource, WebDatasetSource
from unialign.data import (
    Collator,
    DataError,
    ImageLoadError,
    MixedIterableDataset,
    PairDataset,
    PixelNormalizer,
    Record,
    RecordStream,
    ResumableSampler,
    build_image_transform,
    build_train_dataset,
    load_image,
    make_synthetic_karpathy,
    read_karpathy,
    read_karpathy_eval,
    read_manifest,
    stable_id,
    write_manifest,
    write_webdataset_shards,
)
from unialign.data.records import namespaced_id, read_source
from unialign.data.synthetic import vocabulary
from unialign.training.datamodule import RetrievalDataModule

SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


# ---------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 train + 4 restval + 4 val images, 2 captions each."""
    root = tmp_path_factory.mktemp("world")
    make_synthetic_karpathy(root, 32, captions_per_image=2, image_size=SIZE, seed=1,
                            split_counts={"train": 24, "restval": 4, "val": 4})
    return root


@pytest.fixture(scope="module")
def world_json(world: Path) -> Path:
    return world / "dataset_synthetic.json"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [w for w in dict.fromkeys([*vocabulary(), *string.ascii_lowercase, *string.digits]) if w not in words]
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(words) + "\n")
    # transformers 5 ignores ``vocab_file=`` here (only the special tokens would be known)
    return BertTokenizerFast(vocab=str(path))


@pytest.fixture(scope="module")
def train_tf() -> Any:
    return build_image_transform(SIZE, MEAN, STD, train=True, scale=(0.5, 1.0))


@pytest.fixture(scope="module")
def shards(world: Path, world_json: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two shard sources: A (txt captions, 2 corrupt images), B (json captions, one without caption)."""
    out = tmp_path_factory.mktemp("shards")
    records = read_karpathy(world_json, world, ["train"]).records
    a_records = records[:20]
    corrupt = out / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    a_records[3] = Record(str(corrupt), a_records[3].caption, 3)
    a_records[11] = Record(str(corrupt), a_records[11].caption, 11)
    b_records = records[20:36]
    b_records[5] = Record(b_records[5].image, "", 5)  # the writer keeps it; the reader must flag it
    return {"a": write_webdataset_shards(a_records, out / "a", 6),
            "b": write_webdataset_shards(b_records, out / "b", 5, caption_in="json"),
            "a_records": a_records, "b_records": b_records}


def _collect(loader: Any) -> list[dict[str, Any]]:
    return [batch for batch in loader]


# ---------------------------------------------------------------------------------------
# Records


def test_karpathy_reader_splits_ids_paths(world: Path, world_json: Path) -> None:
    rs = read_karpathy(world_json, world, ["train", "restval"])
    assert len(rs.records) == 56 and rs.skipped_empty == 0
    assert all(Path(r.image).is_file() for r in rs.records)
    assert rs.records[0].image == str(world / "images" / "000000.png")
    assert rs.records[0].image_id == rs.records[1].image_id == stable_id("images/000000.png")
    assert len({r.image_id for r in rs.records}) == 28
    assert len(read_karpathy(world_json, world, ["val"]).records) == 8


def test_karpathy_empty_caption_and_no_filepath(tmp_path: Path) -> None:
    path = tmp_path / "flickr.json"
    path.write_text(json.dumps({"images": [
        {"filename": "1.jpg", "split": "train", "imgid": 0, "sentences": [{"raw": "A dog ."}, {"raw": "  "}]},
        {"filename": "2.jpg", "split": "test", "imgid": 1, "sentences": [{"raw": "A cat ."}]},
    ]}))
    rs = read_karpathy(path, tmp_path / "imgs", ["train", "restval"])
    assert rs.records == [Record(str(tmp_path / "imgs" / "1.jpg"), "A dog .", stable_id("1.jpg"))]
    assert rs.skipped_empty == 1


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"pictures": []}), "'images'"),
    (json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": []},
                            {"filename": "b.jpg", "split": "train"}]}), "images[1].sentences"),
    (json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"tokens": []}]}]}),
     "images[0].sentences[0].raw"),
    (json.dumps({"images": [{"filename": "a.jpg", "split": "val", "sentences": []}]}), "no image has split"),
])
def test_karpathy_errors_name_file_and_field(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_karpathy(path, tmp_path, ["train"])
    assert str(path) in str(err.value) and needle in str(err.value)


def test_karpathy_eval_unique_images(world: Path, world_json: Path) -> None:
    rs = read_karpathy_eval(world_json, world, "val")
    assert len(rs.images) == 4 and len(rs.captions) == 8
    assert rs.caption_to_image == [0, 0, 1, 1, 2, 2, 3, 3]
    assert rs.images[0].endswith("000028.png")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_manifest_roundtrip(world: Path, world_json: Path, tmp_path: Path, suffix: str) -> None:
    records = read_karpathy(world_json, world, ["train"]).records[:6]
    path = write_manifest(records, tmp_path / f"m{suffix}", relative_to=world)
    rs = read_manifest(path, world)
    assert rs.records == records and rs.skipped_empty == 0


def test_manifest_optional_id_empty_caption_and_errors(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("image,caption\nimgs/a.png,a red circle\nimgs/b.png,\n")
    rs = read_manifest(tmp_path / "m.csv")  # image root defaults to the manifest's folder
    assert rs.records == [Record(str(tmp_path / "imgs/a.png"), "a red circle", stable_id("imgs/a.png"))]
    assert rs.skipped_empty == 1
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "text": "x"}\n')
    with pytest.raises(DataError, match="'caption' is missing"):
        read_manifest(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "caption": "x", "image_id": "abc"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:1: field 'image_id'.*'abc'"):
        read_manifest(tmp_path / "m.jsonl")


# ---------------------------------------------------------------------------------------
# Images and transforms


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_transparency_composited_onto_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # invisible black
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    out = load_image(_png(rgba))
    assert out.mode == "RGB"
    assert out.getpixel((3, 3)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((1, 0)) == (127, 127, 255)
    la = Image.new("LA", (2, 2), (0, 0))
    assert load_image(_png(la)).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 1
    (tmp_path / "p.png").write_bytes(_png(pal))
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)


def test_load_image_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"garbage bytes, not an image")
    with pytest.raises(ImageLoadError, match="bad.png: cannot decode"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ImageLoadError, match="missing.png: image file not found"):
        load_image(tmp_path / "missing.png")
    truncated = _png(Image.new("RGB", (64, 64), (1, 2, 3)))[:-40]
    with pytest.raises(ImageLoadError):
        load_image(truncated)


def test_transform_shapes_and_normalisation() -> None:
    white = Image.new("RGB", (50, 40), (255, 255, 255))
    for train in (True, False):
        out = build_image_transform(SIZE, MEAN, STD, train=train)(white)
        assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
        assert torch.allclose(out, torch.full_like(out, (1 - 0.5) / 0.25), atol=1e-3)
    with pytest.raises(ValueError, match="interpolation"):
        build_image_transform(SIZE, MEAN, STD, train=False, interpolation="nearest")


def test_training_view_at_scale_one_is_the_whole_image_as_evaluated() -> None:
    """train_scale (1, 1) without flips: every draw is the eval view, for a wide image too (a random
    resized crop at scale 1 centre-crops an image wider than 4:3)."""
    wide = Image.new("RGB", (60, 20), (255, 255, 255))
    wide.paste((200, 0, 0), (0, 0, 12, 20))  # a red band at the left edge: cut off by a centre crop
    train = build_image_transform(SIZE, MEAN, STD, train=True, scale=(1.0, 1.0), hflip=False)
    evaluated = build_image_transform(SIZE, MEAN, STD, train=False)(wide)
    torch.manual_seed(0)
    for _ in range(5):
        assert torch.equal(train(wide), evaluated)


def test_device_normalisation_equals_host_normalisation(world: Path) -> None:
    """uint8 out of the loader + PixelNormalizer after the copy gives the very same floats."""
    images = [Image.open(p).convert("RGB") for p in sorted((world / "images").glob("*.png"))[:6]]
    for train in (True, False):
        host, device = (build_image_transform(SIZE, MEAN, STD, train=train, scale=(0.5, 1.0), normalize=n)
                        for n in (True, False))
        torch.manual_seed(0)
        expected = torch.stack([host(im) for im in images])
        torch.manual_seed(0)
        raw = torch.stack([device(im) for im in images])
        assert raw.dtype == torch.uint8
        assert torch.equal(PixelNormalizer(MEAN, STD)(raw), expected)
    normalizer = PixelNormalizer(MEAN, STD)
    assert normalizer(expected) is expected  # float input is taken as normalised
    with pytest.raises(TypeError, match="int16"):
        normalizer(raw.to(torch.int16))


def test_datamodule_normalises_after_the_transfer(world: Path, world_json: Path, tokenizer: Any) -> None:
    batches = {}
    for on_device in (True, False):
        cfg = DataConfig(train=[KarpathySource(path=world_json, images=world, splits=["train"])], image_size=SIZE,
                         mean=MEAN, std=STD, num_workers=0, normalize_on_device=on_device)
        dm = RetrievalDataModule(cfg, tokenizer, 16, batch_size=4, seed=3)
        batches[on_device] = next(iter(dm.train_dataloader()))
        assert batches[on_device]["image"].dtype == (torch.uint8 if on_device else torch.float32)
        batches[on_device] = dm.on_after_batch_transfer(batches[on_device], 0)  # what Lightning calls
    assert torch.equal(batches[True]["image"], batches[False]["image"])


# ---------------------------------------------------------------------------------------
# Datasets and batching


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_images_skipped_and_counted(world: Path, world_json: Path, tokenizer: Any, train_tf: Any,
                                        tmp_path: Path, num_workers: int) -> None:
    records = read_karpathy(world_json, world, ["train"]).records[:10]
    (tmp_path / "garbage.png").write_bytes(b"\x00\x01 definitely not an image")
    records[2] = Record(str(tmp_path / "garbage.png"), "a red circle", 1)
    records[7] = Record(str(tmp_path / "missing.png"), "a blue square", 2)
    loader = DataLoader(PairDataset(records, train_tf), batch_size=4, num_workers=num_workers,
                        collate_fn=Collator(tokenizer, 16))
    batches = _collect(loader)
    assert sum(b["n_skipped"] for b in batches) == 2
    assert sum(b["size"] for b in batches) == 8
    names = [name for b in batches for name, _ in b["skipped"]]
    assert names == [str(tmp_path / "garbage.png"), str(tmp_path / "missing.png")]
    first = batches[0]
    assert first["image"].shape == (3, 3, SIZE, SIZE)
    assert first["input_ids"].shape == first["attention_mask"].shape and first["input_ids"].shape[0] == 3
    assert (first["input_ids"] != tokenizer.unk_token_id).all()
    assert first["image_id"].dtype == torch.long and first["index"].tolist() == [0, 1, 3]


def test_all_bad_batch_is_empty_but_counted(tokenizer: Any) -> None:
    batch = Collator(tokenizer, 16)([{"bad": "x.png", "reason": "r"}] * 3)
    assert batch["size"] == 0 and batch["n_skipped"] == 3
    assert batch["image"].shape[0] == batch["input_ids"].shape[0] == batch["image_id"].shape[0] == 0


def test_teacher_view_is_its_own_augmentation(world: Path, world_json: Path, train_tf: Any, tokenizer: Any) -> None:
    records = read_karpathy(world_json, world, ["train"]).records[:4]
    teacher_tf = build_image_transform(SIZE + 8, MEAN, STD, train=True, scale=(0.5, 1.0))
    ds = PairDataset(records, train_tf, teacher_tf, seed=3)
    sample = ds[0]
    assert sample["teacher_image"].shape == (3, SIZE + 8, SIZE + 8)
    assert torch.equal(ds[0]["teacher_image"], sample["teacher_image"])
    batch = Collator(tokenizer, 16)([ds[i] for i in range(4)])
    assert batch["teacher_image"].shape == (4, 3, SIZE + 8, SIZE + 8)


def test_collator_rounds_caption_length_up(world: Path, world_json: Path, train_tf: Any, tokenizer: Any) -> None:
    ds = PairDataset(read_karpathy(world_json, world, ["train"]).records[:4], train_tf, seed=3)
    exact = Collator(tokenizer, 40)([ds[i] for i in range(4)])
    rounded = Collator(tokenizer, 40, pad_to_multiple_of=8)([ds[i] for i in range(4)])
    length = exact["input_ids"].shape[1]
    assert length % 8 != 0  # the synthetic captions make an odd length, so the rounding shows
    assert rounded["input_ids"].shape[1] == -(-length // 8) * 8
    assert torch.equal(rounded["input_ids"][:, :length], exact["input_ids"])
    assert rounded["attention_mask"][:, length:].sum() == 0 and (rounded["input_ids"][:, length:] == 0).all()


@pytest.mark.parametrize("caption_in", ["txt", "json"])
def test_webdataset_single_source_reads_every_pair(world: Path, world_json: Path, train_tf: Any,
                                                   tmp_path: Path, caption_in: str) -> None:
    records = read_karpathy(world_json, world, ["train"]).records[:10]
    urls = write_webdataset_shards(records, tmp_path, 4, caption_in=caption_in)  # type: ignore[arg-type]
    assert urls.endswith("shard-{000000..000002}.tar")
    source = WebDatasetSource(urls=urls, size=10)
    ds = build_train_dataset([source], train_tf, seed=0, shuffle_buffer=0)
    assert isinstance(ds, MixedIterableDataset)  # a shard source streams
    samples = list(ds)
    assert len(samples) == len(ds) == 10
    ns = source.namespace()
    assert ns == tmp_path.name  # the shard folder
    assert sorted((s["caption"], s["image_id"]) for s in samples) == \
        sorted((r.caption, namespaced_id(ns, r.image_id)) for r in records)


def test_image_ids_are_namespaced_by_source(world: Path, world_json: Path, train_tf: Any, tmp_path: Path) -> None:
    """Two sources that both number their images from 0 must not share ids: same-image positives
    (and the teacher cache) would otherwise pair unrelated images."""
    from unialign.config import ManifestSource

    records = read_karpathy(world_json, world, ["train"]).records[:6]
    numbered = [Record(r.image, r.caption, i // 2) for i, r in enumerate(records)]  # ids 0, 0, 1, 1, 2, 2
    ids = []
    for name in ("cc3m", "cc12m"):
        urls = write_webdataset_shards(numbered, tmp_path / name, 3)  # type: ignore[arg-type]
        ids.append({s["image_id"] for s in build_train_dataset([WebDatasetSource(urls=urls, size=6)], train_tf,
                                                                seed=0, shuffle_buffer=0)})
    assert len(ids[0]) == len(ids[1]) == 3 and not ids[0] & ids[1]
    a = write_manifest(numbered, tmp_path / "a.jsonl")
    b = write_manifest(numbered, tmp_path / "b.jsonl")
    ids_a = [r.image_id for r in read_source(ManifestSource(path=a)).records]
    ids_b = [r.image_id for r in read_source(ManifestSource(path=b)).records]
    assert ids_a[0] == ids_a[1] != ids_a[2] and not set(ids_a) & set(ids_b)  # grouping kept within a source
    renamed = read_source(ManifestSource(path=b, id_namespace="a.jsonl")).records
    assert [r.image_id for r in renamed] == ids_a  # the namespace, not the file, decides
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="id namespace 'a.jsonl'"):
        DataConfig(train=[ManifestSource(path=a), ManifestSource(path=tmp_path / "x" / "a.jsonl")])


def test_webdataset_two_sources_mixed_with_corrupt_members(shards: dict[str, Any], world: Path, world_json: Path,
                                                           tokenizer: Any, train_tf: Any) -> None:
    sources = [WebDatasetSource(urls=shards["a"], size=20), WebDatasetSource(urls=shards["b"], size=16)]
    ds = build_train_dataset(sources, train_tf, seed=0, batch_size=4)
    assert isinstance(ds, MixedIterableDataset) and len(ds) == 36
    batches = _collect(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=Collator(tokenizer, 16)))
    assert len(batches) == 9
    a_ids = {namespaced_id("a", r.image_id) for r in shards["a_records"]}  # namespaced by shard folder
    b_ids = {namespaced_id("b", r.image_id) for r in shards["b_records"]}
    ids = [i for b in batches for i in b["image_id"].tolist()]
    assert set(ids) & a_ids and set(ids) & b_ids and set(ids) <= a_ids | b_ids
    reasons = [reason for b in batches for _, reason in b["skipped"]]
    assert sum(b["size"] + b["n_skipped"] for b in batches) == 36
    assert any("cannot decode" in r for r in reasons) and any(r == "no caption" for r in reasons)
    assert {3, 11, 5}.isdisjoint(ids)


def test_mixed_map_and_shard_sources(shards: dict[str, Any], world: Path, world_json: Path, train_tf: Any) -> None:
    karpathy = read_karpathy(world_json, world, ["restval"])
    ds = build_train_dataset([karpathy, WebDatasetSource(urls=shards["b"], size=16)], train_tf, seed=0, batch_size=2)
    samples = list(ds)
    assert len(samples) == 24
    assert {s["image_id"] for s in samples if "image_id" in s} & {r.image_id for r in karpathy.records}
    assert isinstance(build_train_dataset([karpathy, karpathy], train_tf), PairDataset)


def test_augmentation_deterministic_across_workers_and_epochs(world: Path, world_json: Path, tokenizer: Any,
                                                              train_tf: Any) -> None:
    records = read_karpathy(world_json, world, ["train"]).records[:16]

    def run(num_workers: int, epoch: int) -> list[dict[str, Any]]:
        ds = PairDataset(records, train_tf, seed=7)
        sampler = ResumableSampler(len(ds), shuffle=True, seed=7, on_set_epoch=ds.set_epoch)
        sampler.set_epoch(epoch)
        torch.manual_seed(epoch + 100 * num_workers)  # global RNG state must not matter
        return _collect(DataLoader(ds, sampler=sampler, batch_size=4, num_workers=num_workers,
                                   collate_fn=Collator(tokenizer, 16)))

    a, b = run(0, 1), run(2, 1)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image_id"], y["image_id"]) and torch.equal(x["image"], y["image"])
    c = run(0, 2)
    assert not torch.equal(torch.cat([x["image"] for x in a]), torch.cat([x["image"] for x in c]))
    ds = PairDataset(records, train_tf, seed=7)
    ds.set_epoch(2)
    assert torch.equal(ds[5]["image"], ds[5]["image"])
    assert not torch.equal(ds[5]["image"], PairDataset(records, train_tf, seed=8)[5]["image"])


# ---------------------------------------------------------------------------------------
# Sampler and iterable resume


def test_sampler_split_permutation_and_skip() -> None:
    shares = [list(ResumableSampler(10, seed=3, rank=r, world_size=3, drop_last=True)) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    assert len({i for s in shares for i in s}) == 9  # disjoint
    padded = [list(ResumableSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in padded] == [4, 4, 4] and {i for s in padded for i in s} == set(range(10))
    s = ResumableSampler(10, seed=3)
    first = list(s)
    assert sorted(first) == list(range(10)) and list(s) == first
    s.set_epoch(1)
    second = list(s)
    other = ResumableSampler(10, seed=3)
    other.set_epoch(1)
    assert second != first and second == list(other)
    s.skip(4)
    assert len(s) == 10 and list(s) == second[4:]
    assert list(s) == second  # the skip applies once
    assert list(ResumableSampler(5, shuffle=False, rank=1, world_size=2)) == [1, 3, 0]
    with pytest.raises(ValueError):
        s.skip(11)


@pytest.mark.parametrize("num_workers, skip_batches", [(0, 3), (2, 3), (2, 4)])
def test_iterable_skip_resumes_same_order(shards: dict[str, Any], world: Path, world_json: Path, tokenizer: Any,
                                          train_tf: Any, num_workers: int, skip_batches: int) -> None:
    karpathy = read_karpathy(world_json, world, ["train"])

    def run(skip: int) -> list[tuple[list[int], float]]:
        ds = build_train_dataset([karpathy, WebDatasetSource(urls=shards["b"], size=16)], train_tf, seed=5,
                                 batch_size=4)
        ds.set_epoch(1)
        ds.skip(skip * 4)
        loader = DataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=Collator(tokenizer, 16))
        return [(b["image_id"].tolist(), float(b["image"].sum())) for b in loader]

    full = run(0)
    assert len(full) == 16
    assert run(skip_batches) == full[skip_batches:]


def test_iterable_ranks_and_workers_split_one_pass(world: Path, world_json: Path, train_tf: Any) -> None:
    records = read_karpathy(world_json, world, ["train"]).records  # 48 pairs
    seen: Counter[tuple[int, str]] = Counter()
    for rank in range(2):
        ds = MixedIterableDataset([RecordStream(records, "train")], train_tf, seed=2, rank=rank, world_size=2,
                                  batch_size=4)
        assert len(ds) == 24
        loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=lambda items: items)
        seen.update((s["image_id"], s["caption"]) for batch in loader for s in batch)
    assert seen == Counter((r.image_id, r.caption) for r in records)


# ---------------------------------------------------------------------------------------
# Lightning mid-epoch resume


class _Crash(RuntimeError):
    pass


class _Recorder(LightningModule):
    """Records each training batch's ids and pixel sum; optionally crashes at a global step."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.crash_at = crash_at
        self.steps_asked: int | None = None
        self.seen: list[tuple[list[int], float]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.global_step == self.crash_at:
            raise _Crash(f"planned crash at step {self.global_step}")
        self.seen.append((batch["image_id"].tolist(), round(float(batch["image"].sum()), 3)))
        return self.layer(batch["image"].mean(dim=(2, 3))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # as SMKETraining does for its schedule: this builds the train loader early
        self.steps_asked = self.trainer.estimated_stepping_batches
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _RestoreAfterSetup(SingleDeviceStrategy):
    """Reads the checkpoint after setup, as FSDP does: the train loader already exists by then."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def _fit(dm_factory: Any, module: _Recorder, ckpt_dir: Path | None = None, every: int = 0,
         ckpt_path: Path | None = None, strategy: Any = "auto") -> None:
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=every,
                                 save_top_k=-1)] if ckpt_dir else []
    trainer = Trainer(max_epochs=2, accelerator="cpu", devices=1, strategy=strategy, logger=False,
                      enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                      enable_checkpointing=bool(callbacks), callbacks=callbacks, default_root_dir=ckpt_dir)
    dm = dm_factory()
    if ckpt_path is not None and getattr(strategy, "restore_checkpoint_after_setup", False):
        dm.read_checkpoint(ckpt_path)  # what unialign.training.train does on --resume
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)


def _check_resume(dm_factory: Any, tmp_path: Path, steps_per_epoch: int, every: int, crash_at: int,
                  resume_steps: list[int], strategy: Any = None) -> None:
    uninterrupted = _Recorder()
    _fit(dm_factory, uninterrupted)
    assert len(uninterrupted.seen) == 2 * steps_per_epoch
    crashed = _Recorder(crash_at=crash_at)
    with pytest.raises(_Crash):
        _fit(dm_factory, crashed, tmp_path, every)
    assert crashed.seen == uninterrupted.seen[:crash_at]
    for step in resume_steps:
        resumed = _Recorder()
        _fit(dm_factory, resumed, ckpt_path=tmp_path / f"step={step}.ckpt", strategy=strategy() if strategy else "auto")
        assert crashed.seen[:step] + resumed.seen == uninterrupted.seen, f"resume from step {step}"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_mid_epoch_resume_map_style(world: Path, world_json: Path, tokenizer: Any, tmp_path: Path,
                                              num_workers: int) -> None:
    cfg = DataConfig(train=[KarpathySource(path=world_json, images=world, splits=["train"])], image_size=SIZE,
                     num_workers=num_workers, train_scale=(0.5, 1.0))
    # 48 pairs / batch 4 = 12 steps per epoch; checkpoints at steps 6 (mid epoch 0),
    # 12 (the last batch of epoch 0) and 18 (mid epoch 1); crash at step 20.
    _check_resume(lambda: RetrievalDataModule(cfg, tokenizer, 16, batch_size=4, seed=11), tmp_path,
                  steps_per_epoch=12, every=6, crash_at=20, resume_steps=[6, 12, 18])


@pytest.mark.parametrize("iterable", [False, True])
def test_mid_epoch_resume_when_the_strategy_restores_after_setup(shards: dict[str, Any], world: Path,
                                                                 world_json: Path, tokenizer: Any, tmp_path: Path,
                                                                 iterable: bool) -> None:
    """FSDP reads the checkpoint after configure_optimizers has built the train loader (found on an
    H100: the resumed FSDP run started its epoch from the first batch); the data position must
    still be restored."""
    sources = [KarpathySource(path=world_json, images=world, splits=["train"])]
    if iterable:
        sources = [KarpathySource(path=world_json, images=world, splits=["restval"]),
                   WebDatasetSource(urls=shards["b"], size=16)]
    cfg = DataConfig(train=sources, image_size=SIZE, num_workers=0)
    steps = 6 if iterable else 12
    _check_resume(lambda: RetrievalDataModule(cfg, tokenizer, 16, batch_size=4, seed=11), tmp_path,
                  steps_per_epoch=steps, every=steps // 2, crash_at=steps + steps // 2 + 1,
                  resume_steps=[steps // 2, steps + steps // 2],
                  strategy=lambda: _RestoreAfterSetup(torch.device("cpu")))


def test_lightning_mid_epoch_resume_webdataset_workers(shards: dict[str, Any], world: Path, world_json: Path,
                                                       tokenizer: Any, tmp_path: Path) -> None:
    cfg = DataConfig(train=[KarpathySource(path=world_json, images=world, splits=["restval"]),
                            WebDatasetSource(urls=shards["b"], size=16)], image_size=SIZE, num_workers=2)
    # 24 pairs / batch 4 = 6 steps per epoch; resume at step 3 (odd: workers change roles)
    _check_resume(lambda: RetrievalDataModule(cfg, tokenizer, 16, batch_size=4, seed=11), tmp_path,
                  steps_per_epoch=6, every=3, crash_at=8, resume_steps=[3, 6])


def test_datamodule_stats_and_val_loader(world: Path, world_json: Path, tokenizer: Any) -> None:
    (world / "extra.jsonl").write_text('{"image": "images/000000.png", "caption": " "}\n'
                                       '{"image": "images/000001.png", "caption": "a box"}\n')
    cfg = DataConfig.model_validate({
        "train": [{"type": "karpathy", "path": world_json, "images": world},
                  {"type": "manifest", "path": world / "extra.jsonl"}],
        "val": {"type": "karpathy", "path": world_json, "images": world},
        "image_size": SIZE, "num_workers": 0})
    dm = RetrievalDataModule(cfg, tokenizer, 16, batch_size=4, seed=0)
    dm.setup("fit")
    assert dm.stats["train_pairs"] == 57 and dm.stats["train_skipped_empty"] == 1
    assert [s["pairs"] for s in dm.stats["train"]] == [56, 1]
    assert dm.stats["val"]["images"] == 4 and dm.val_set is not None and len(dm.val_set.captions) == 8
    assert len(dm.train_dataloader()) == 14
    val = _collect(dm.val_dataloader())
    assert torch.cat([b["index"] for b in val]).tolist() == list(range(8))
    assert torch.equal(val[0]["image"], _collect(dm.val_dataloader())[0]["image"])
