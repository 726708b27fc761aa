"""Query-bank normalisation: the inverted softmax over a bank of training queries, as one number per item.

A joint embedding space has hubs: gallery items that score well against most queries and so crowd the top
ranks of queries they do not answer. The inverted softmax (Smith et al., ICLR 2017) ranks gallery item g for
query q by exp(b s(q, g)) / sum over bank queries q' of exp(b s(q', g)), g's score against how well it scores
against queries in general; QB-Norm (Bogolin et al., CVPR 2022) takes the bank from the training queries,
so that nothing about the test queries is used. Its log, divided by b, is the cosine minus a bias of g alone:

    s'(q, g) = s(q, g) - bias(g),    bias(g) = (1/b) log mean over q' of exp(b s(q', g))

so a search index stores the bias beside each item and a single query needs no bank at all. b defaults to
the model's logit scale (the inverse temperature its contrastive loss trained at); by cross-validation on
Tux Paint it is on the flat top of b = 7 to 14 (docs/RECIPE.md section 15).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["querybank_bias"]


@torch.no_grad()
def querybank_bias(gallery: Tensor, bank: Tensor, beta: float, chunk_size: int = 4096) -> Tensor:
    """bias(g) above for each row of `gallery` (N, D) against the `bank` (M, D) of embeddings of the
    other modality, both L2-normalised; (N,) float32. Built in `chunk_size` blocks, as recall is."""
    if gallery.ndim != 2 or bank.ndim != 2 or gallery.shape[1] != bank.shape[1]:
        raise ValueError(f"gallery and bank must be (N, D) and (M, D), got {tuple(gallery.shape)} and "
                         f"{tuple(bank.shape)}")
    if bank.shape[0] == 0:
        raise ValueError("the query bank is empty")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta (the inverse temperature) must be a positive number, got {beta!r}")
    gallery, bank = gallery.float(), bank.to(device=gallery.device, dtype=torch.float32)
    out = torch.empty(gallery.shape[0], dtype=torch.float32, device=gallery.device)
    for g0 in range(0, gallery.shape[0], chunk_size):
        part = gallery[g0:g0 + chunk_size]
        lse = torch.full((part.shape[0],), float("-inf"), device=gallery.device)
        for b0 in range(0, bank.shape[0], chunk_size):
            lse = torch.logaddexp(lse, torch.logsumexp(beta * part @ bank[b0:b0 + chunk_size].T, dim=1))
        out[g0:g0 + chunk_size] = (lse - math.log(bank.shape[0])) / beta
    return out
