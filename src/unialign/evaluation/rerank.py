"""Re-ranking the dual encoder's top K with a pair scorer (ALBEF's ITM re-ranking protocol).

For every query, both ways (image->text and text->image), the K best candidates by the dual
encoder's cosine similarity are scored again by `score_pairs` (the ITM head's match probability,
`evaluation.itm_score`; a stub in tests) and re-ordered by that score; candidates beyond K keep
the dual encoder's order below them. Ranks follow `evaluation.retrieval`'s rules, so the same
metrics apply (`metrics_from_ranks`):

* a query whose positive is among its K candidates gets the re-ranked rank: the number of
  negative candidates scoring ``>=`` its (best) positive's score (ties against the model);
* a query whose positive is not among them keeps its dual-encoder rank (which is then ``>= K``).

The similarity matrix is never held whole: candidates are taken per block of queries, as
`retrieval_ranks` scores, so COCO-5K (5,000 x 25,010) costs a block at a time. Every distinct
(image, caption) pair is scored once, even when it is a candidate in both directions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .retrieval import metrics_from_ranks, retrieval_ranks

# (P, 2) long tensor of (image index, caption index) pairs -> (P,) scores, higher = better match
PairScorer = Callable[[Tensor], Tensor]

__all__ = ["PairScorer", "rerank_metrics", "rerank_ranks", "topk_candidates"]


@torch.no_grad()
def topk_candidates(query_emb: Tensor, gallery_emb: Tensor, k: int, chunk_size: int = 4096) -> Tensor:
    """(Q, k) indices into the gallery of each query's k highest dot products, best first."""
    k = min(k, gallery_emb.shape[0])
    dtype = torch.promote_types(torch.promote_types(query_emb.dtype, gallery_emb.dtype), torch.float32)
    gallery = gallery_emb.to(dtype)
    return torch.cat([(query_emb[q0:q0 + chunk_size].to(dtype) @ gallery.T).topk(k, dim=1).indices
                      for q0 in range(0, query_emb.shape[0], chunk_size)])


def _reranked(scores: Tensor, positive: Tensor, dual: Tensor) -> Tensor:
    """Ranks after re-ordering the candidates by `scores` (Q, K); `positive` (Q, K) marks the
    query's positives among them; queries with none keep their `dual` rank."""
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1)
    ahead = ((scores >= best[:, None]) & ~positive).sum(dim=1)
    return torch.where(positive.any(dim=1), ahead, dual)


@torch.no_grad()
def rerank_ranks(image_emb: Tensor, text_emb: Tensor, caption_to_image: Tensor, k: int,
                 score_pairs: PairScorer, dual_ranks: tuple[Tensor, Tensor] | None = None,
                 chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """``(text_ranks, image_ranks)`` as `retrieval_ranks` gives them, after re-ranking each query's
    top `k` candidates with `score_pairs`. `dual_ranks`: the dual encoder's ranks when already
    computed (else computed here)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if dual_ranks is None:
        dual_ranks = retrieval_ranks(image_emb, text_emb, caption_to_image, chunk_size=chunk_size)
    dual_text, dual_image = (r.cpu() for r in dual_ranks)
    owner = caption_to_image.cpu().long()
    n_images, n_captions = image_emb.shape[0], text_emb.shape[0]
    i2t = topk_candidates(image_emb, text_emb, k, chunk_size).cpu()  # (N, k') caption indices
    t2i = topk_candidates(text_emb, image_emb, k, chunk_size).cpu()  # (M, k'') image indices

    # every distinct (image, caption) pair once, keyed image * M + caption
    keys_i2t = torch.arange(n_images)[:, None] * n_captions + i2t
    keys_t2i = t2i * n_captions + torch.arange(n_captions)[:, None]
    keys, inverse = torch.unique(torch.cat([keys_i2t.flatten(), keys_t2i.flatten()]), return_inverse=True)
    pairs = torch.stack([keys // n_captions, keys % n_captions], dim=1)
    scores = score_pairs(pairs).detach().float().cpu()
    if scores.shape != (pairs.shape[0],):
        raise ValueError(f"the pair scorer returned shape {tuple(scores.shape)} for {pairs.shape[0]} pairs")
    flat = scores[inverse]
    s_i2t = flat[:keys_i2t.numel()].view_as(i2t)
    s_t2i = flat[keys_i2t.numel():].view_as(t2i)

    text_ranks = _reranked(s_i2t, owner[i2t] == torch.arange(n_images)[:, None], dual_text)
    image_ranks = _reranked(s_t2i, t2i == owner[:, None], dual_image)
    device = dual_ranks[0].device
    return text_ranks.to(device), image_ranks.to(device)


def rerank_metrics(image_emb: Tensor, text_emb: Tensor, caption_to_image: Tensor, k: int,
                   score_pairs: PairScorer, dual_ranks: tuple[Tensor, Tensor] | None = None,
                   ks: Iterable[int] = (1, 5, 10), chunk_size: int = 4096) -> dict[str, float]:
    """`retrieval_metrics`' keys for the re-ranked ranking, plus ``rerank_k``."""
    ranks = rerank_ranks(image_emb, text_emb, caption_to_image, k, score_pairs, dual_ranks, chunk_size)
    return {**metrics_from_ranks(*ranks, ks), "rerank_k": k}
