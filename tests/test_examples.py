"""Search examples: the fixed query rule and the picture (hits framed, answer last)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from unialign.examples import MARK, THUMB, draw_search_examples, pick_queries


def test_pick_queries_follows_the_hash_order_of_the_captions() -> None:
    captions = [f"caption number {i}" for i in range(50)]
    want = sorted(captions, key=lambda c: hashlib.blake2b(c.encode(), digest_size=8).hexdigest())[:4]
    picks = pick_queries(captions, 4)
    assert [captions[i] for i in picks] == want
    # The choice depends on the captions, not on their order in the file.
    shuffled = list(reversed(captions))
    assert [shuffled[i] for i in pick_queries(shuffled, 4)] == want


def test_picture_frames_the_correct_hit_and_shows_the_answer(tmp_path: Path) -> None:
    colours = {"a.png": (200, 0, 0), "b.png": (0, 0, 200), "c.png": (0, 200, 200)}
    for name, colour in colours.items():
        Image.new("RGB", (40, 20), colour).save(tmp_path / name)
    examples = [{"query": "a blue thing", "correct": "b.png", "correct_rank": 2,
                 "top": [{"file": "a.png", "score": 0.5, "correct": False},
                         {"file": "b.png", "score": 0.4, "correct": True},
                         {"file": "missing.png", "score": 0.3, "correct": False}]}]
    out = draw_search_examples(examples, tmp_path, tmp_path / "out" / "examples.png")
    sheet = Image.open(out).convert("RGB")
    pad, text_h = 8, 34
    y = pad + text_h
    second = pad + THUMB + pad
    assert sheet.getpixel((second - 2, y + THUMB // 2)) == MARK  # frame around the correct hit
    assert sheet.getpixel((pad - 2, y + THUMB // 2)) != MARK  # none around the wrong one
    assert sheet.getpixel((pad + THUMB // 2, y + THUMB // 2)) == colours["a.png"]  # thumbnails in rank order
    assert sheet.getpixel((second + THUMB // 2, y + THUMB // 2)) == colours["b.png"]
    third = second + THUMB + pad
    assert sheet.getpixel((third + THUMB // 2, y + THUMB // 2)) == (200, 200, 200)  # unreadable: grey slot
    answer = third + THUMB + 2 * pad
    assert sheet.getpixel((answer + THUMB // 2, y + THUMB // 2)) == colours["b.png"]  # the answer comes last


def test_every_caption_is_searched_and_counted_as_the_evaluation_counts_it(tmp_path: Path,
                                                                         tiny_checkpoint: Path) -> None:
    """The share of test captions whose image is in the top K equals the evaluation's text->image
    recall@K on the same model and images; an unreadable image drops out with its captions."""
    import json

    from unialign.data import make_synthetic_karpathy
    from unialign.evaluation.models import load_eval_model
    from unialign.evaluation.run import evaluate_retrieval_model
    from unialign.examples import search_examples

    make_synthetic_karpathy(tmp_path, n_images=14, captions_per_image=2, image_size=32, seed=5,
                            split_counts={"train": 2, "test": 12})
    dataset = tmp_path / "dataset_synthetic.json"
    test = [im for im in json.loads(dataset.read_text())["images"] if im["split"] == "test"]
    (tmp_path / test[3]["filepath"] / test[3]["filename"]).write_bytes(b"not an image")
    found = search_examples(tiny_checkpoint, dataset, tmp_path, n_queries=4, top_k=5)
    metrics = evaluate_retrieval_model(load_eval_model(str(tiny_checkpoint), "cpu"), dataset, images=tmp_path,
                                       split="test", progress=False, max_missing_fraction=0.5)
    assert found["captions"] == metrics["n_captions"] == 22 and found["top_k"] == 5
    assert 100 * found["found"] / found["captions"] == pytest.approx(metrics["img_r5"])
    assert len(found["queries"]) == 4
    for ex in found["queries"]:
        hit = [t["correct"] for t in ex["top"]]
        assert len(hit) == 5
        if ex["correct_rank"] is None:  # the unreadable image's caption: its hits, but no rank
            assert not any(hit)
        else:
            assert any(hit) == (ex["correct_rank"] <= 5)
            assert not any(hit) or hit.index(True) + 1 == ex["correct_rank"]


def test_search_with_a_query_bank_counts_as_the_evaluation_does(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """With the training captions as a query bank, the share of captions found in the top K is the
    evaluation's text->image recall@K with the same bank, and the plain count is its plain recall."""
    from unialign.data import make_synthetic_karpathy
    from unialign.evaluation.models import load_eval_model
    from unialign.evaluation.run import evaluate_retrieval_model
    from unialign.examples import search_examples

    make_synthetic_karpathy(tmp_path, n_images=20, captions_per_image=2, image_size=32, seed=6,
                            split_counts={"train": 8, "test": 12})
    dataset = tmp_path / "dataset_synthetic.json"
    found = search_examples(tiny_checkpoint, dataset, tmp_path, n_queries=4, top_k=1, bank_splits=("train",))
    metrics = evaluate_retrieval_model(load_eval_model(str(tiny_checkpoint), "cpu"), dataset, images=tmp_path,
                                       split="test", progress=False, query_bank="train")
    assert found["query_bank"] == 16 == metrics["query_bank"]["bank_captions"]
    assert 100 * found["found"] / found["captions"] == pytest.approx(metrics["query_bank"]["img_r1"])
    assert 100 * found["found_plain"] / found["captions"] == pytest.approx(metrics["img_r1"])
    assert found["found"] != found["found_plain"]  # the bank changed the ranking (4 against 2 here)
    for ex in found["queries"]:
        hit = [t["correct"] for t in ex["top"]]
        assert any(hit) == (ex["correct_rank"] <= 1)
        assert [t["score"] for t in ex["top"]] == sorted((t["score"] for t in ex["top"]), reverse=True)
