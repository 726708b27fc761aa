"""Exact image-text retrieval recall (COCO 5K / Flickr30K 1K Karpathy protocol).

Scores are plain dot products ``image_emb @ text_emb.T``; callers L2-normalise the
embeddings so that this is cosine similarity.

Tie rule (pessimistic): the rank of a positive is the number of *negatives* whose
score is ``>=`` the positive's score, 0-based. Ties are thus always resolved
against the model, so collapsed or degenerate embeddings (all scores equal) give
recall near 0 instead of an inflated 100%, and the result never depends on a sort
or ``topk`` tie order. CLIP_benchmark ranks with ``torch.topk``, whose order among
equal scores is unspecified; without exact ties both give the same numbers.

The score matrix is only ever built in ``chunk_size x chunk_size`` blocks, so the
evaluation of ~1M captions stays within a fixed memory budget on any device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["metrics_from_ranks", "recall_at_k", "retrieval_metrics", "retrieval_ranks"]


def _validate(image_emb: Tensor, text_emb: Tensor, caption_to_image: Tensor, chunk_size: int) -> None:
    """Fail loudly: a silent mis-alignment would produce plausible but wrong recalls."""
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(
            f"image_emb and text_emb must be 2-D, got shapes {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    n_images, n_captions = image_emb.shape[0], text_emb.shape[0]
    if n_images == 0 or n_captions == 0:
        raise ValueError(f"need at least one image and one caption, got {n_images} images and {n_captions} captions")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"embedding dims differ: image_emb has {image_emb.shape[1]}, text_emb has {text_emb.shape[1]}"
        )
    if not (image_emb.is_floating_point() and text_emb.is_floating_point()):
        raise TypeError(f"embeddings must be floating point, got {image_emb.dtype} and {text_emb.dtype}")
    if image_emb.device != text_emb.device:
        raise ValueError(f"embeddings are on different devices: {image_emb.device} and {text_emb.device}")
    if caption_to_image.ndim != 1 or caption_to_image.shape[0] != n_captions:
        raise ValueError(
            f"caption_to_image must have shape ({n_captions},) to match text_emb, got {tuple(caption_to_image.shape)}"
        )
    if caption_to_image.is_floating_point() or caption_to_image.is_complex() or caption_to_image.dtype == torch.bool:
        raise TypeError(f"caption_to_image must be an integer tensor, got {caption_to_image.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    lo, hi = int(caption_to_image.min()), int(caption_to_image.max())
    if lo < 0 or hi >= n_images:
        raise ValueError(f"caption_to_image values must lie in [0, {n_images - 1}], got range [{lo}, {hi}]")
    counts = torch.bincount(caption_to_image.long(), minlength=n_images)
    missing = torch.nonzero(counts == 0).flatten()
    if missing.numel() > 0:
        raise ValueError(
            f"image {int(missing[0])} has no caption ({missing.numel()} image(s) without captions in total)"
        )
    # NaN compares False with everything, which would rank every NaN positive first.
    if not (bool(torch.isfinite(image_emb).all()) and bool(torch.isfinite(text_emb).all())):
        raise ValueError("embeddings contain NaN or Inf")


@torch.no_grad()
def retrieval_ranks(
    image_emb: Tensor,
    text_emb: Tensor,
    caption_to_image: Tensor,
    chunk_size: int = 4096,
    image_bias: Tensor | None = None,
    text_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact 0-based ranks of the positives, computed block-wise.

    Returns ``(text_ranks, image_ranks)``:

    * ``text_ranks`` (shape ``N``, image->text): for each image, the rank of its
      best-scoring caption among all ``M`` captions, i.e. the number of captions of
      *other* images scoring ``>=`` its best caption. ``recall@K`` is ``rank < K``,
      so an image is a hit when any of its captions is in its top K.
    * ``image_ranks`` (shape ``M``, text->image): for each caption, the number of
      other images scoring ``>=`` its own image.

    Both are int64 on the embeddings' device. Low-precision embeddings are scored in
    float32 so that rounding does not manufacture ties.

    `image_bias` (N,) and `text_bias` (M,) are subtracted from every score of their image or caption
    (query-bank normalisation, `evaluation.querybank`): an image's bias moves it against the other
    images in text->image ranking, a caption's against the other captions in image->text ranking.
    """
    _validate(image_emb, text_emb, caption_to_image, chunk_size)
    for name, bias, like in (("image_bias", image_bias, image_emb), ("text_bias", text_bias, text_emb)):
        if bias is not None and (bias.shape != like.shape[:1] or bias.device != like.device
                                 or not bool(torch.isfinite(bias).all())):
            raise ValueError(f"{name} must be finite, of shape ({like.shape[0]},) and on {like.device}, "
                             f"got shape {tuple(bias.shape)} on {bias.device}")
    dtype = torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    device = image_emb.device
    images = image_emb.to(dtype)
    texts = text_emb.to(dtype)
    owner = caption_to_image.to(device=device, dtype=torch.long)
    n_images, n_captions = images.shape[0], texts.shape[0]

    # Positive score of every caption with its own image; an image's best positive is the max.
    positive = torch.cat(
        [
            (images[owner[c0 : c0 + chunk_size]] * texts[c0 : c0 + chunk_size]).sum(dim=1)
            for c0 in range(0, n_captions, chunk_size)
        ]
    )
    # Subtracting zeros leaves every score as it was, bit for bit.
    image_bias = torch.zeros(n_images, dtype=dtype, device=device) if image_bias is None else image_bias.to(dtype)
    text_bias = torch.zeros(n_captions, dtype=dtype, device=device) if text_bias is None else text_bias.to(dtype)
    positive = positive - image_bias[owner] - text_bias
    best_positive = torch.full((n_images,), float("-inf"), dtype=dtype, device=device)
    best_positive.scatter_reduce_(0, owner, positive, reduce="amax")

    text_ranks = torch.zeros(n_images, dtype=torch.long, device=device)
    image_ranks = torch.zeros(n_captions, dtype=torch.long, device=device)
    for i0 in range(0, n_images, chunk_size):
        i1 = min(i0 + chunk_size, n_images)
        image_ids = torch.arange(i0, i1, device=device)
        for c0 in range(0, n_captions, chunk_size):
            c1 = min(c0 + chunk_size, n_captions)
            scores = images[i0:i1] @ texts[c0:c1].T - image_bias[i0:i1, None] - text_bias[None, c0:c1]
            # Positives are excluded by index, not by value, so a pair never competes with itself.
            negative = owner[c0:c1].unsqueeze(0) != image_ids.unsqueeze(1)
            text_ranks[i0:i1] += ((scores >= best_positive[i0:i1].unsqueeze(1)) & negative).sum(dim=1)
            image_ranks[c0:c1] += ((scores >= positive[c0:c1].unsqueeze(0)) & negative).sum(dim=0)
    return text_ranks, image_ranks


def recall_at_k(ranks: Tensor, k: int) -> float:
    """Fraction of queries whose positive has 0-based rank ``< k``; exact count ratio, not a float32 mean."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if ranks.ndim != 1 or ranks.numel() == 0:
        raise ValueError(f"ranks must be a non-empty 1-D tensor, got shape {tuple(ranks.shape)}")
    return int((ranks < k).sum()) / ranks.numel()


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    caption_to_image: Tensor,
    ks: Iterable[int] = (1, 5, 10),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Paper-style recalls in percent plus CLIP_benchmark-named fractions, from one exact ranking pass.

    Keys: ``txt_r{k}`` (image->text) and ``img_r{k}`` (text->image) in percent;
    ``r_mean`` / ``rsum``, the mean / sum of those percentages; and
    ``text_retrieval_recall@{k}`` / ``image_retrieval_recall@{k}`` as fractions,
    named as in CLIP_benchmark so results can be compared directly.
    """
    ks = _check_ks(ks)
    text_ranks, image_ranks = retrieval_ranks(image_emb, text_emb, caption_to_image, chunk_size=chunk_size)
    return metrics_from_ranks(text_ranks, image_ranks, ks)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one k")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every k must be a positive int, got {k!r}")
    return ks


def metrics_from_ranks(text_ranks: Tensor, image_ranks: Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """The metrics of :func:`retrieval_metrics` from ranks already computed (the ranks of
    :func:`retrieval_ranks`, or re-ranked ones: `evaluation.rerank`)."""
    ks = _check_ks(ks)
    metrics: dict[str, float] = {}
    for k in ks:
        txt, img = recall_at_k(text_ranks, k), recall_at_k(image_ranks, k)
        metrics[f"txt_r{k}"] = 100.0 * txt
        metrics[f"img_r{k}"] = 100.0 * img
        metrics[f"text_retrieval_recall@{k}"] = txt
        metrics[f"image_retrieval_recall@{k}"] = img
    percents = [metrics[f"{side}_r{k}"] for side in ("txt", "img") for k in ks]
    metrics["rsum"] = sum(percents)
    metrics["r_mean"] = metrics["rsum"] / len(percents)
    return metrics
