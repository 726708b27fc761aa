"""Re-ranking a text query's image hits with the model's ITM head (`Searcher.search_text(rerank=)`).

The index stores embeddings only, not the shared block's token sequences the ITM head fuses
(an image's is hundreds of times larger), so the hits' files are read and encoded again: a cost
of `rerank` image encodings per query, which is why it is off by default.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import torch
from PIL import Image

from ..data.images import load_image
from ..evaluation.itm_score import itm_probabilities, text_tokens
from ..model.smke import SMKE
from .query import Hit

log = logging.getLogger(__name__)

IMAGE_BATCH = 32  # hit images encoded at once


@torch.inference_mode()
def rerank_hits(model: SMKE, preprocess: Callable, tokenizer: Callable, text: str, hits: list[Hit],
                device: str | torch.device, read_image: Callable[[str], Image.Image] | None = None) -> list[Hit]:
    """`hits` re-ordered by the ITM match probability of (`text`, hit image), highest first, ranks
    renumbered from 1; equal probabilities keep the dual encoder's order. A file that cannot be read
    any more (or that `read_image` refuses) goes after the scored ones (with a warning), in its old order.

    `read_image`: path -> RGB image (default `load_image`); the web service passes one that keeps
    its decode limits."""
    read = read_image or load_image
    txt, mask = text_tokens(model, tokenizer, [text], device)
    probs: list[float] = []
    for start in range(0, len(hits), IMAGE_BATCH):
        batch = hits[start:start + IMAGE_BATCH]
        pixels, readable = [], []
        for j, hit in enumerate(batch):
            try:
                pixels.append(preprocess(read(hit.path)))
                readable.append(j)
            except Exception as err:  # moved or damaged since indexing: ranked last, not fatal
                log.warning("re-rank: cannot read %s (%s); it goes last", hit.path, err)
        scores = [float("-inf")] * len(batch)
        if pixels:
            img = model.image_embeddings(torch.stack(pixels).to(device)).tokens
            n = img.shape[0]
            p = itm_probabilities(model, img, txt.expand(n, -1, -1), mask.expand(n, -1))
            for j, value in zip(readable, p.tolist()):
                scores[j] = value
        probs.extend(scores)
    order = sorted(range(len(hits)), key=lambda i: -probs[i])  # sorted() is stable: ties keep FAISS order
    return [replace(hits[i], rank=rank) for rank, i in enumerate(order, 1)]
