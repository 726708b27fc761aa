"""Search examples for reports: queries chosen by a fixed rule, their top hits, and a picture.

The queries are the held-out captions that come first in blake2b order of their text: the
choice depends on nothing but the captions, so nobody picks the examples that look good, and
the same model always shows the same examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import atomic_path

if TYPE_CHECKING:
    from .evaluation.encode import PixelMemo

THUMB = 112  # thumbnail side in the picture, pixels
MARK = (30, 150, 60)  # the captioned image's frame (green)


def pick_queries(captions: list[str], n: int) -> list[int]:
    """Indices of the `n` captions first in blake2b order of their text (ties: caption order)."""
    order = sorted(range(len(captions)),
                   key=lambda i: (hashlib.blake2b(captions[i].encode("utf-8"), digest_size=8).hexdigest(), i))
    return order[:n]


def search_examples(checkpoint: Path, karpathy: Path, images: Path, n_queries: int = 4,
                    top_k: int = 3, memo: PixelMemo | None = None, bank_splits: Sequence[str] = ()) -> dict[str, Any]:
    """Text-to-image search on a split's test images with every one of its captions: `n_queries` of them
    (see pick_queries) as examples with their `top_k` hits, and for all of them how many find their image
    in the top `top_k` (so a reader can tell how typical the examples are). `memo`: preprocessed pixels of
    an evaluation of the same images (evaluation.encode.PixelMemo). `bank_splits`: the training splits
    whose captions form a query bank (evaluation.querybank): the search ranks as an index built with
    `--query-bank` does, and ``found_plain`` says how many find their image by the cosine alone.

    Returns ``{"queries": [...], "top_k": K, "captions": N, "found": F}``: N captions of readable images,
    F of them with their image among the K best-scoring; with `bank_splits` also ``query_bank`` (its
    captions) and ``found_plain``."""
    import torch

    from .data.records import read_karpathy, read_karpathy_eval
    from .evaluation.encode import encode_images, encode_texts
    from .evaluation.querybank import querybank_bias
    from .evaluation.retrieval import retrieval_ranks
    from .evaluation.run import default_device
    from .model.factory import load

    device = default_device()
    model, preprocess, tokenizer = load(checkpoint, device=device)
    data = read_karpathy_eval(karpathy, images, "test")
    image_emb, kept, _ = encode_images(model, preprocess, data.images, device=device, progress=False, memo=memo)
    position = {image: j for j, image in enumerate(kept)}
    text_emb = encode_texts(model, tokenizer, data.captions, device=device, progress=False)
    scored = [i for i, image in enumerate(data.caption_to_image) if image in position]  # captions of readable images
    owner = torch.tensor([position[data.caption_to_image[i]] for i in scored])
    bias = torch.zeros(len(kept), device=image_emb.device)
    extra: dict[str, Any] = {}
    if bank_splits:
        plain = retrieval_ranks(image_emb, text_emb[scored], owner)[1]
        bank = [r.caption for r in read_karpathy(karpathy, images, list(bank_splits)).records]
        bias = querybank_bias(image_emb, encode_texts(model, tokenizer, bank, device=device, progress=False),
                              float(model.scales()[0].detach()))
        extra = {"query_bank": len(bank), "found_plain": int((plain < top_k).sum())}
    _, ranks = retrieval_ranks(image_emb, text_emb[scored], owner, image_bias=bias)
    rank_of = {i: int(rank) for i, rank in zip(scored, ranks)}
    picks = pick_queries(data.captions, n_queries)
    # the examples' rows only: retrieval_ranks scored the rest block-wise
    scores = text_emb[picks] @ image_emb.T - bias
    root = Path(images)
    examples = []
    for row, i in enumerate(picks):
        truth = data.images[data.caption_to_image[i]]
        top = scores[row].topk(min(top_k, len(kept))).indices.tolist()
        examples.append({
            "query": data.captions[i],
            "correct": _relative(truth, root),
            "correct_rank": rank_of[i] + 1 if i in rank_of else None,
            "top": [{"file": _relative(data.images[kept[j]], root), "score": round(float(scores[row, j]), 4),
                     "correct": data.images[kept[j]] == truth} for j in top],
        })
    return {"queries": examples, "top_k": top_k, "captions": len(scored), "found": int((ranks < top_k).sum()),
            **extra}


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def _thumbnail(path: Path) -> Any:
    from PIL import Image

    from .data.images import load_image

    try:
        img = load_image(path)
    except Exception:  # an unreadable file still gets its slot in the picture, grey
        return Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
    img.thumbnail((THUMB, THUMB))
    canvas = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    canvas.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
    return canvas


def draw_search_examples(examples: list[dict[str, Any]], images: Path, path: Path) -> Path:
    """One row per query: the query, its top hits (the captioned image framed in green, with its
    score), and, last, the captioned image itself with the rank the model gave it. PNG, atomic."""
    from PIL import Image, ImageDraw

    pad, text_h = 8, 34
    cols = max((len(ex["top"]) for ex in examples), default=0) + 1
    width = pad + cols * (THUMB + pad) + pad
    height = pad + len(examples) * (text_h + THUMB + 18 + pad)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = pad
    for ex in examples:
        draw.text((pad, y), f"\"{ex['query'][:90]}\"", fill=(0, 0, 0))
        draw.text((pad, y + 14), "top hits, then the captioned image", fill=(110, 110, 110))
        y += text_h
        x = pad
        for hit in ex["top"]:
            sheet.paste(_thumbnail(Path(images) / hit["file"]), (x, y))
            if hit["correct"]:
                draw.rectangle([x - 3, y - 3, x + THUMB + 2, y + THUMB + 2], outline=MARK, width=3)
            draw.text((x, y + THUMB + 4), f"{hit['score']:.3f}{'  correct' if hit['correct'] else ''}",
                      fill=MARK if hit["correct"] else (0, 0, 0))
            x += THUMB + pad
        x += pad
        sheet.paste(_thumbnail(Path(images) / ex["correct"]), (x, y))
        draw.rectangle([x - 3, y - 3, x + THUMB + 2, y + THUMB + 2], outline=MARK, width=1)
        rank = ex.get("correct_rank")
        draw.text((x, y + THUMB + 4), f"answer, rank {rank}" if rank else "answer", fill=MARK)
        y += THUMB + 18 + pad
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
