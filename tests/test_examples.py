"""Search examples: the fixed query rule and the picture (hits framed, answer last)."""

from __future__ import annotations

import hashlib
from pathlib import Path

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
