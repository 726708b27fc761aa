"""Search with a query bank: text scores are cosine minus each image's bias, kept through incremental builds,
rebuilt when the bank changes; image search stays cosine; bad bank files are refused by name."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_search import build_tiny, make_images, searcher_factory  # noqa: F401  (fixture)

from unialign.search.app import create_app
from unialign.search.build import entries_from_folder
from unialign.search.cli import register
from unialign.search.store import IndexStore, SearchIndexError

BANK = ["a red square", "a green square", "a red square on grey", "something blue"]


def _reference(searcher, paths: list[Path], bank: list[str]) -> dict[str, float]:
    """cosine - (1/beta) log mean exp(beta cos(image, bank text)) per image, for BANK's first query,
    from embeddings made one at a time through the searcher (not the builder's batches)."""
    beta = float(searcher.model.logit_scale.detach().exp())
    images = np.concatenate([searcher.embed_image(Image.open(p).convert("RGB")) for p in paths]).astype(np.float64)
    texts = np.concatenate([searcher.embed_text(t) for t in bank]).astype(np.float64)
    bias = np.log(np.exp(beta * images @ texts.T).mean(axis=1)) / beta
    assert np.ptp(bias) > 1e-3  # the images' biases differ: a search that ignored them would fail below
    cosine = images @ texts[0]
    return {str(p.absolute()): float(c - b) for p, c, b in zip(paths, cosine, bias)}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_text_search_scores_cosine_minus_bias(tiny_checkpoint, tmp_path, searcher_factory):  # noqa: F811
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    paths = make_images(tmp_path / "imgs", colours)
    bank = _write(tmp_path / "bank.txt", BANK)
    # built in two steps (the second appends to images.faiss) with chunks of 2
    for n in (3, 6):
        entries = [e for e in entries_from_folder(tmp_path / "imgs") if any(e.path.endswith(f"/{c}_square.png")
                                                                          for c in colours[:n])]
        report = build_tiny(tiny_checkpoint, tmp_path / "index", entries, chunk_size=2,
                            query_bank=bank if n == 3 else None)  # the bank is kept by the second build
        assert report.query_bank == len(BANK)
    s = searcher_factory(tmp_path / "index")
    want = _reference(s, paths, BANK)
    hits = s.search_text(BANK[0], k=10)
    assert {h.path: h.score for h in hits} == pytest.approx(want, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    with TestClient(create_app(s, allowed_hosts=["testserver"])) as client:  # the service: the same scores
        assert client.get("/api/health").json()["query_bank"] == len(BANK)
        found = client.get("/api/search", params={"q": BANK[0], "k": 10}).json()["results"]
        assert {h["name"]: h["score"] for h in found} == pytest.approx({Path(p).name: v for p, v in want.items()},
                                                                       abs=1e-5)
    same = s.search_image(Image.open(paths[0]).convert("RGB"), k=1)[0]  # image search: cosine, no bias
    assert same.path == str(paths[0].absolute()) and same.score == pytest.approx(1.0, abs=1e-4)


def test_a_new_bank_rebuilds_the_biases(tiny_checkpoint, tmp_path, searcher_factory):  # noqa: F811
    paths = make_images(tmp_path / "imgs", ["red", "green", "blue", "white"])
    entries = entries_from_folder(tmp_path / "imgs")
    build_tiny(tiny_checkpoint, tmp_path / "index", entries, query_bank=_write(tmp_path / "a.txt", BANK))
    other = ["white things", "a black circle", "a red square"]
    build_tiny(tiny_checkpoint, tmp_path / "index", entries, query_bank=_write(tmp_path / "b.txt", other))
    assert len(list((tmp_path / "index").glob("query_bank-*.npy"))) == 1  # the old bank's file is gone
    with IndexStore(tmp_path / "index") as store:
        assert store.meta()["query_bank_size"] == "3"
    s = searcher_factory(tmp_path / "index")
    want = _reference(s, paths, other)
    assert {h.path: h.score for h in s.search_text(other[0], k=4)} == pytest.approx(want, abs=1e-5)


def test_a_search_refuses_biases_of_another_bank(tiny_checkpoint, tmp_path, searcher_factory):  # noqa: F811
    """As after a build that stopped between storing a new bank and rebuilding images.faiss."""
    make_images(tmp_path / "imgs", ["red", "green"])
    entries = entries_from_folder(tmp_path / "imgs")
    build_tiny(tiny_checkpoint, tmp_path / "index", entries, query_bank=_write(tmp_path / "a.txt", BANK))
    with IndexStore(tmp_path / "index", readonly=False) as store:
        store.set_meta({"images_faiss_query_bank": "0" * 64})
    with pytest.raises(SearchIndexError, match="was not built for the index's query bank"):
        searcher_factory(tmp_path / "index")
    build_tiny(tiny_checkpoint, tmp_path / "index", entries)  # the next build repairs it
    assert searcher_factory(tmp_path / "index").search_text(BANK[0], k=2)


def test_bad_bank_files_are_refused(tiny_checkpoint, tmp_path):
    make_images(tmp_path / "imgs", ["red", "green"])
    entries = entries_from_folder(tmp_path / "imgs")
    for name, content, message in [("q.txt", "\n \n", "no queries in it"),
                                   ("q.tsv", "a\tb\n", "expected a .txt file"),
                                   ("missing.txt", None, "cannot read")]:
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(SearchIndexError, match=f"--query-bank {path}: {message}"):
            build_tiny(tiny_checkpoint, tmp_path / "index", entries, query_bank=path)


def test_cli_says_the_bank_is_in_use(tiny_checkpoint, tmp_path, capsys):
    make_images(tmp_path / "imgs", ["red", "green", "blue"])
    parser = argparse.ArgumentParser(prog="unialign")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["index", "build", "--checkpoint", str(tiny_checkpoint), "--images",
                              str(tmp_path / "imgs"), "--output", str(tmp_path / "index"), "--device", "cpu",
                              "--no-progress", "--query-bank", str(_write(tmp_path / "bank.txt", BANK))])
    args.func(args)
    assert "text search normalised by a query bank of 4 queries" in capsys.readouterr().out
