"""Search index: build, incremental add, resume after a crash, skipped files, model identity, ANN recall, CLI.

Helpers here (coloured PNGs, tiny indexes) are imported by the other test_search_* files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from unialign.search import ann, build
from unialign.search.build import Entry, build_index, entries_from_folder, entries_from_manifest
from unialign.search.cli import register
from unialign.search.query import Searcher
from unialign.search.store import CAPTION_INDEX, IMAGE_INDEX, IndexStore, SearchIndexError

TEST_HOSTS = ["testserver"]  # the Host that TestClient and schemathesis send; create_app answers loopback only
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
           "purple": (140, 40, 160), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (10, 10, 10)}


def draw(colour: str, shape: str = "square", size: int = 32) -> Image.Image:
    """A coloured shape on grey: distinct pictures for an untrained model to tell apart."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    pen = ImageDraw.Draw(image)
    (pen.ellipse if shape == "circle" else pen.rectangle)(box, fill=COLOURS[colour])
    return image


def make_images(folder: Path, colours: list[str], shape: str = "square") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for colour in colours:
        path = folder / f"{colour}_{shape}.png"
        draw(colour, shape).save(path)
        paths.append(path)
    return paths


def make_manifest(folder: Path, colours: list[str]) -> Path:
    """Images plus a JSONL manifest with two captions for each (relative paths)."""
    make_images(folder / "img", colours)
    rows = [{"image": f"img/{c}_square.png", "caption": text, "image_id": i}
            for i, c in enumerate(colours) for text in (f"a {c} square", f"the {c} box in the middle")]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def build_tiny(checkpoint: Path, out: Path, entries: list[Entry], **kwargs: object) -> build.BuildReport:
    return build_index(checkpoint, entries, out, device="cpu", progress=False, **kwargs)


class EncodeSpy:
    """Wraps encode_images: records the paths it embeds, optionally crashes on a given call."""

    def __init__(self, crash_on_call: int | None = None) -> None:
        self.paths: list[str] = []
        self.calls = 0
        self.crash_on_call = crash_on_call
        self.real = build.encode_images

    def __call__(self, model, preprocess, paths, *args, **kwargs):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise KeyboardInterrupt("simulated interruption")
        self.paths.extend(paths)
        return self.real(model, preprocess, paths, *args, **kwargs)


@pytest.fixture(scope="module")
def searcher_factory():
    """Searchers opened in a test, closed after it (each loads the tiny model: about a second)."""
    opened: list[Searcher] = []

    def open_(index: Path, **kwargs: object) -> Searcher:
        s = Searcher(index, device="cpu", **kwargs)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


def test_build_search_and_skip_unreadable(tiny_checkpoint, tmp_path, searcher_factory):
    images = make_images(tmp_path / "imgs", ["red", "green", "blue", "yellow", "purple"])
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image suffix: never considered")
    report = build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"), chunk_size=2)

    broken = str((tmp_path / "imgs" / "broken.png").absolute())
    assert report.added == 5 and report.items == 5 and report.requested == 6
    assert [p for p, _ in report.skipped] == [broken]
    assert "cannot decode" in report.skipped[0][1]
    with IndexStore(tmp_path / "index") as store:
        assert [p for p, _ in store.skipped()] == [broken]
        meta = store.meta()
        assert meta["checkpoint_sha256"] and int(meta["dim"]) > 0 and meta["index_type"] == "auto"
    assert report.image_index == "Flat (exact)" and report.caption_index is None
    assert not (tmp_path / "index" / CAPTION_INDEX).exists()

    s = searcher_factory(tmp_path / "index")
    for path in images:
        hits = s.search_image(Image.open(path).convert("RGB"), k=3)
        assert hits[0].path == str(path.absolute())
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)  # the same pixels embed identically
        assert [h.rank for h in hits] == [1, 2, 3]
    hits = s.search_text("a red square", k=10)
    assert len(hits) == 5  # k is capped by the collection size
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert {h.path for h in hits} == {str(p.absolute()) for p in images}
    with pytest.raises(SearchIndexError, match="holds no captions"):
        s.search_captions("red", k=3)


def test_incremental_build_embeds_only_new_files(tiny_checkpoint, tmp_path, monkeypatch, searcher_factory):
    make_images(tmp_path / "imgs", ["red", "green", "blue"])
    build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"))
    new = make_images(tmp_path / "imgs", ["yellow", "purple"], shape="circle")

    spy = EncodeSpy()
    monkeypatch.setattr(build, "encode_images", spy)
    report = build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"))
    assert sorted(spy.paths) == sorted(str(p.absolute()) for p in new)
    assert (report.added, report.already_indexed, report.items) == (2, 3, 5)

    # Nothing new: the model is not even loaded.
    monkeypatch.setattr(build, "load", lambda *a, **k: pytest.fail("model loaded with nothing to embed"))
    report = build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"))
    assert (report.added, report.already_indexed, report.items) == (0, 5, 5)

    s = searcher_factory(tmp_path / "index")
    assert s.size == 5
    assert s.search_image(Image.open(new[1]).convert("RGB"), k=1)[0].path == str(new[1].absolute())


def test_rebuild_with_nothing_new_writes_no_chunk(tiny_checkpoint, tmp_path):
    make_images(tmp_path / "imgs", ["red", "green"])
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")  # retried by every build
    build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"))
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "index").rglob("*"))
    for _ in range(2):
        report = build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"))
        assert (report.added, report.already_indexed, [p for p, _ in report.skipped]) == (
            0, 2, [str(tmp_path / "imgs" / "broken.png")])
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "index").rglob("*")) == files
    with IndexStore(tmp_path / "index") as store:
        assert [c.n_images for c in store.chunks()] == [2] and len(store.skipped()) == 1


def test_symlinks_are_not_followed(tiny_checkpoint, tmp_path):
    make_images(tmp_path / "imgs", ["red", "green"])
    outside = make_images(tmp_path / "private", ["blue", "yellow"])
    folder = tmp_path / "imgs"
    (folder / "link_out.png").symlink_to(outside[0])
    (folder / "link_in.png").symlink_to(folder / "red_square.png")
    (folder / "linked_dir").symlink_to(tmp_path / "private", target_is_directory=True)
    entries = entries_from_folder(folder)
    links = {str(folder / n) for n in ("link_out.png", "link_in.png", "linked_dir")}
    assert {e.path for e in entries if e.skip} == links
    report = build_tiny(tiny_checkpoint, tmp_path / "index", entries)
    assert (report.added, report.items) == (2, 2)
    assert sorted(report.skipped) == sorted((p, build.SYMLINK_SKIPPED) for p in links)
    with IndexStore(tmp_path / "index") as store:
        assert {p for p, _ in store.skipped()} == links
        assert not any("private" in p for p in store.known_paths())
    for p in outside:
        p.unlink()
    (folder / "red_square.png").unlink()
    (folder / "green_square.png").unlink()
    with pytest.raises(SearchIndexError, match="no image files .*3 symlink"):
        entries_from_folder(folder)


def test_embed_row_names_survive_a_newline_in_a_file_name(tiny_checkpoint, tmp_path, capsys):
    from unialign.cli import main

    make_images(tmp_path / "imgs", ["red"])
    draw("green").save(tmp_path / "imgs" / "a\nb.png")
    main(["embed", "--checkpoint", str(tiny_checkpoint), "--images", str(tmp_path / "imgs"), "--output",
          str(tmp_path / "x.npy"), "--device", "cpu"])
    rows = np.load(tmp_path / "x.npy")
    names = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert names == [str(tmp_path / "imgs" / "a\nb.png"), str(tmp_path / "imgs" / "red_square.png")]
    assert rows.shape[0] == len(names) and not (tmp_path / "x.txt").exists()
    assert f"row names in {tmp_path / 'x.jsonl'}" in capsys.readouterr().out


def test_embed_and_index_build_take_the_same_image_files(tiny_checkpoint, tmp_path):
    """`embed --images` and `index build --images` walk a folder with one suffix set (TIFF included)."""
    from unialign.cli import main

    folder = tmp_path / "imgs"
    make_images(folder, ["red"])
    draw("green").save(folder / "scan.tif")
    draw("blue").save(folder / "PHOTO.TIFF")
    (folder / "notes.txt").write_text("not an image\n")
    main(["embed", "--checkpoint", str(tiny_checkpoint), "--images", str(folder), "--output",
          str(tmp_path / "x.npy"), "--device", "cpu"])
    names = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert names == [str(folder / n) for n in ("PHOTO.TIFF", "red_square.png", "scan.tif")]
    assert np.load(tmp_path / "x.npy").shape[0] == 3
    assert sorted(e.path for e in entries_from_folder(folder)) == sorted(names)


def test_cli_manifest_images_is_the_root_of_its_relative_paths(tiny_checkpoint, tmp_path, capsys):
    """With --manifest, --images names the folder the manifest's relative image paths start from."""
    make_manifest(tmp_path / "data", ["red", "green"])
    moved = tmp_path / "lists" / "manifest.jsonl"
    moved.parent.mkdir()
    shutil.move(tmp_path / "data" / "manifest.jsonl", moved)
    _cli(["index", "build", "--checkpoint", str(tiny_checkpoint), "--manifest", str(moved),
          "--images", str(tmp_path / "data"), "--output", str(tmp_path / "index"), "--device", "cpu", "--no-progress"])
    assert "2 image(s) and 4 caption(s) embedded, 0 already indexed, 0 skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give --images FOLDER or --manifest FILE"):
        _cli(["index", "build", "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "index")])


def test_interrupted_build_resumes_without_reembedding(tiny_checkpoint, tmp_path, monkeypatch, searcher_factory):
    images = make_images(tmp_path / "imgs", ["red", "green", "blue", "yellow", "purple", "orange"])
    entries = entries_from_folder(tmp_path / "imgs")
    monkeypatch.setattr(build, "encode_images", EncodeSpy(crash_on_call=2))
    with pytest.raises(KeyboardInterrupt):
        build_tiny(tiny_checkpoint, tmp_path / "index", entries, chunk_size=2)
    with IndexStore(tmp_path / "index") as store:
        assert store.counts()["items"] == 2  # the first chunk was committed
    with pytest.raises(SearchIndexError, match="interrupted"):
        searcher_factory(tmp_path / "index")

    spy = EncodeSpy()
    monkeypatch.setattr(build, "encode_images", spy)
    report = build_tiny(tiny_checkpoint, tmp_path / "index", entries, chunk_size=2)
    assert spy.paths == [e.path for e in entries[2:]]  # the first chunk (2 files) is not embedded again
    assert (report.added, report.already_indexed, report.items) == (4, 2, 6)
    s = searcher_factory(tmp_path / "index")
    assert s.size == 6
    for path in images:
        assert s.search_image(Image.open(path).convert("RGB"), k=1)[0].path == str(path.absolute())


def test_crash_inside_a_commit_leaves_no_partial_chunk(tiny_checkpoint, tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", ["red", "green", "blue"])
    entries = entries_from_folder(tmp_path / "imgs")
    real_write = IndexStore._write_vectors

    def write_then_die(self, name, vectors):
        real_write(self, name, vectors)
        raise OSError("disk vanished after the vector file was written")

    monkeypatch.setattr(IndexStore, "_write_vectors", write_then_die)
    with pytest.raises(OSError, match="disk vanished"):
        build_tiny(tiny_checkpoint, tmp_path / "index", entries)
    with IndexStore(tmp_path / "index") as store:
        assert store.counts()["items"] == 0 and store.chunks() == []  # rows rolled back
    assert len(list((tmp_path / "index" / "vectors").iterdir())) == 1  # an unreferenced file

    monkeypatch.setattr(IndexStore, "_write_vectors", real_write)
    report = build_tiny(tiny_checkpoint, tmp_path / "index", entries)
    assert report.items == 3
    with IndexStore(tmp_path / "index") as store:
        assert sorted(f.name for f in (tmp_path / "index" / "vectors").iterdir()) == [c.file for c in store.chunks()]


def test_refuses_to_mix_models(tiny_checkpoint, tmp_path, searcher_factory):
    make_images(tmp_path / "imgs", ["red", "green"])
    build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"))
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 1
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    make_images(tmp_path / "imgs", ["blue"])
    with pytest.raises(SearchIndexError, match="cannot be mixed") as err:
        build_tiny(other, tmp_path / "index", entries_from_folder(tmp_path / "imgs"))
    assert str(other) in str(err.value) and str(tmp_path / "index") in str(err.value)
    with pytest.raises(SearchIndexError, match="not the model index"):
        searcher_factory(tmp_path / "index", checkpoint=other)
    # The same model under another path is the same model.
    copy = tmp_path / "moved.ckpt"
    shutil.copy(tiny_checkpoint, copy)
    assert build_tiny(copy, tmp_path / "index", entries_from_folder(tmp_path / "imgs")).added == 1


def test_refuses_a_non_index_directory(tiny_checkpoint, tmp_path):
    make_images(tmp_path / "imgs", ["red"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(SearchIndexError, match="not a search index"):
        build_tiny(tiny_checkpoint, tmp_path / "notes", entries_from_folder(tmp_path / "imgs"))
    with pytest.raises(SearchIndexError, match="not a search index"):
        Searcher(tmp_path / "notes")
    with pytest.raises(SearchIndexError, match="not a directory"):
        entries_from_folder(tmp_path / "missing")


def test_manifest_captions_are_searchable(tiny_checkpoint, tmp_path, searcher_factory):
    colours = ["red", "green", "blue", "yellow"]
    manifest = make_manifest(tmp_path, colours)
    entries = entries_from_manifest(manifest)
    assert [len(e.captions) for e in entries] == [2, 2, 2, 2] and entries[1].image_id == 1
    report = build_tiny(tiny_checkpoint, tmp_path / "index", entries)
    assert (report.items, report.captions, report.captions_added) == (4, 8, 8)
    assert (tmp_path / "index" / CAPTION_INDEX).is_file()

    s = searcher_factory(tmp_path / "index")
    hits = s.search_captions("the blue box in the middle", k=3)
    assert hits[0].path == str((tmp_path / "img" / "blue_square.png").absolute())
    assert hits[0].caption == "the blue box in the middle"
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert len({h.id for h in hits}) == len(hits) == 3  # one hit per image, not per caption
    assert s.search_text("anything", k=2)[0].caption in {f"a {c} square" for c in colours}


def test_changing_index_type_reuses_stored_vectors(tiny_checkpoint, tmp_path, monkeypatch, searcher_factory):
    make_images(tmp_path / "imgs", ["red", "green", "blue"])
    build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"))
    monkeypatch.setattr(build, "load", lambda *a, **k: pytest.fail("no re-embedding needed"))
    report = build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"),
                        index_type="hnsw")
    assert report.image_index.startswith("HNSW32")
    assert ann.params_of(ann.read(tmp_path / "index" / IMAGE_INDEX)).kind == "hnsw"
    # Later builds keep the chosen type.
    assert build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs")).image_index \
        .startswith("HNSW32")
    monkeypatch.undo()
    s = searcher_factory(tmp_path / "index", ef_search=7)
    assert s.image_params.ef_search == 7 and s.size == 3


def _clustered(n: int, dim: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_is_exact_and_ivf_recall_on_random_vectors():
    rng = np.random.default_rng(0)
    base = _clustered(20_000, 64, 200, rng)
    queries = _clustered(200, 64, 200, rng)
    ids = np.arange(100, 100 + len(base))
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :10] + 100

    flat = ann.build(base, ids, ann.choose_params(len(base), "flat"))
    _, found = ann.search(flat, queries, 10)
    np.testing.assert_array_equal(np.sort(found, axis=1), np.sort(truth, axis=1))

    params = ann.choose_params(len(base), "ivf")
    assert params.kind == "ivf" and 1 < params.nprobe < params.nlist
    ivf = ann.build(base, ids, params)
    _, approx = ann.search(ivf, queries, 10)
    recall = np.mean([len(set(a) & set(t)) / 10 for a, t in zip(approx, truth)])
    assert recall >= 0.9, recall
    ann.configure(ivf, ann.AnnParams("ivf", nlist=params.nlist, nprobe=1))
    _, one_list = ann.search(ivf, queries, 10)
    assert np.mean([len(set(a) & set(t)) / 10 for a, t in zip(one_list, truth)]) < recall  # nprobe matters


def test_auto_index_choice():
    assert ann.choose_params(ann.FLAT_MAX).kind == "flat"
    big = ann.choose_params(1_000_000)
    assert big.kind == "ivf" and big.nlist == 2048 and big.nprobe == 64
    assert ann.choose_params(200, "ivf").nlist <= 200 // 39  # never fewer than 39 training points per list
    with pytest.raises(ValueError, match="index type"):
        ann.choose_params(10, "lsh")


def _cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="unialign")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_build_and_search(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    manifest = make_manifest(tmp_path, ["red", "green", "blue"])
    (tmp_path / "img" / "broken.png").write_bytes(b"GIF89a truncated")
    with manifest.open("a") as f:
        f.write(json.dumps({"image": "img/broken.png", "caption": "a broken file"}) + "\n")
    monkeypatch.chdir(tmp_path)
    index = "index"  # relative paths, as typed at a shell
    _cli(["index", "build", "--checkpoint", str(tiny_checkpoint), "--manifest", "manifest.jsonl", "--output", index,
          "--device", "cpu", "--no-progress"])
    out, err = capsys.readouterr()
    assert "3 image(s) and 6 caption(s) embedded, 0 already indexed, 1 skipped" in out and "Flat (exact)" in out
    assert f"skipped: {tmp_path / 'img' / 'broken.png'}: ImageLoadError" in err

    _cli(["search", "--index", str(index), "a red square", "-k", "2", "--device", "cpu"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "path", "caption"] and len(table) == 4
    assert table[2].split()[0] == "1" and "_square.png" in table[2]

    _cli(["search", "--index", str(index), "--captions", "a green square", "--json", "--device", "cpu"])
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["caption"] == "a green square" and hits[0]["path"].endswith("green_square.png")
    assert set(hits[0]) == {"rank", "id", "score", "path", "caption"}

    _cli(["search", "--index", str(index), "--image", str(tmp_path / "img" / "blue_square.png"), "--json",
          "-k", "1", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out)[0]["path"].endswith("blue_square.png")

    with pytest.raises(SystemExit, match="either a text QUERY or --image"):
        _cli(["search", "--index", str(index)])
    with pytest.raises(SystemExit, match="not a search index"):
        _cli(["search", "--index", "img", "dog"])
