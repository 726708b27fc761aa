"""ALBEF's image-text matching loss with contrastive hard negatives (Li et al. 2021, sec. 3.2).

For every image of the batch one negative caption is drawn, with probability proportional to
``softmax(scale * sim)`` over the batch's captions, and for every caption one negative image
likewise; captions of the same image (same image id) are never drawn, so a second caption of
the image is not taught as a mismatch. The ITM head then classifies the B positive pairs and the
2B negative pairs (cross-entropy, labels 1 / 0).

Call, in a training step that already has the ITC similarities (`model.itm` true)::

    from unialign.losses.itm import itm_loss

    img = model.image_embeddings(pixels)                    # Embeddings with .tokens
    txt = model.text_embeddings(input_ids, attention_mask)  # .tokens and .mask
    sim = img.embedding @ txt.embedding.T                   # (B, B) cosine, local batch
    out = itm_loss(model, img.tokens, txt.tokens, txt.mask, sim, image_ids,
                   scale=model.logit_scale.exp(), generator=None)
    total = total + weight * out.loss                       # out.logits, out.labels for accuracy

`sim` must be the local batch's (B, B) image-text matrix, row i / column i being pair i (the
negatives are fused with local tokens, so a gathered matrix cannot be used). `image_ids` (B,)
are the batch's image ids (the training batch's ``image_id``). With ``generator=None`` the draws
come from torch's global generator, so a seeded run is reproducible; pass a generator (on the
device of `sim`) for a separate stream. A pair whose every other batch item shows the same image
has no negative; it is left out of the negatives (``out.labels`` says what was scored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ITMLoss", "ITMOutput", "hard_negative_weights", "itm_loss", "sample_hard_negatives"]


class _Scorer(Protocol):
    def itm_logits(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                   text_mask: torch.Tensor | None) -> torch.Tensor: ...


@dataclass
class ITMOutput:
    loss: torch.Tensor  # scalar cross-entropy over the scored pairs
    logits: torch.Tensor  # (P, 2): B positives first, then the negatives of each image, then of each caption
    labels: torch.Tensor  # (P,) 1 for a match, 0 for a drawn negative


def hard_negative_weights(sim: torch.Tensor, image_ids: torch.Tensor,
                          scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw probabilities ``(image->caption (B, B), caption->image (B, B))``: softmax of the scaled
    similarities with every same-image entry set to 0 (ALBEF's ``weights_i2t`` / ``weights_t2i``).
    A row with no other image is all zeros."""
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be the batch's square (B, B) image-text matrix, got {tuple(sim.shape)}")
    if image_ids.shape != (sim.shape[0],):
        raise ValueError(f"image_ids must have shape ({sim.shape[0]},), got {tuple(image_ids.shape)}")
    with torch.no_grad():  # the draw is a choice, not a function to differentiate
        ids = image_ids.to(sim.device)
        same = ids[:, None] == ids[None, :]
        logits = sim.detach().float() * torch.as_tensor(scale, device=sim.device).detach().float()
        return _masked_softmax(logits, same), _masked_softmax(logits.T, same)


def _masked_softmax(logits: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Row softmax over the entries not `excluded`; a row with none left is all zeros.

    By hand rather than ``masked_fill(-inf).softmax``: a row of -inf would give NaN, and PyTorch's
    CPU softmax takes a very slow path (milliseconds for a 5 x 5) once an entry underflows."""
    low = torch.finfo(logits.dtype).min
    row_max = logits.masked_fill(excluded, low).amax(dim=1, keepdim=True)
    weights = (logits - row_max).masked_fill(excluded, 0.0).exp().masked_fill(excluded, 0.0)
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)


def sample_hard_negatives(sim: torch.Tensor, image_ids: torch.Tensor, scale: float | torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One drawn negative per image and per caption: ``(caption index for each image (B,),
    image index for each caption (B,))``, -1 where no item of another image is in the batch."""
    i2t, t2i = hard_negative_weights(sim, image_ids, scale)
    out = []
    for weights in (i2t, t2i):
        valid = weights.sum(dim=1) > 0
        # rows without a candidate draw from a dummy uniform row, then are marked -1
        safe = torch.where(valid[:, None], weights, torch.ones_like(weights))
        drawn = torch.multinomial(safe, 1, generator=generator).squeeze(1)
        out.append(torch.where(valid, drawn, torch.full_like(drawn, -1)))
    return out[0], out[1]


def _logits(scorer: _Scorer | nn.Module, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
            text_mask: torch.Tensor | None) -> torch.Tensor:
    if hasattr(scorer, "itm_logits"):  # an SMKE (or a DDP-unwrapped one)
        return scorer.itm_logits(image_tokens, text_tokens, text_mask)
    return scorer(image_tokens, text_tokens, text_mask)  # an ITMHead


def itm_loss(scorer: _Scorer | nn.Module, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
             text_mask: torch.Tensor | None, sim: torch.Tensor, image_ids: torch.Tensor,
             scale: float | torch.Tensor, generator: torch.Generator | None = None) -> ITMOutput:
    """The ITM loss of a batch of B pairs (see the module doc for the call in a training step).

    `scorer`: the model (`SMKE.itm_logits`) or an `ITMHead`; `image_tokens` (B, T, D) and
    `text_tokens` (B, L, D) the shared block's output sequences, pair i being (image i, caption i);
    `text_mask` (B, L) nonzero at real tokens; `sim` (B, B) their ITC similarities (cosine);
    `scale` the ITC logit scale (exponentiated: ``model.logit_scale.exp()``), the temperature of
    the draw; `image_ids` (B,) which image each pair shows."""
    neg_text, neg_image = sample_hard_negatives(sim, image_ids, scale, generator)
    b = image_tokens.shape[0]
    idx = torch.arange(b, device=image_tokens.device)
    has_text, has_image = neg_text >= 0, neg_image >= 0
    neg_text, neg_image = neg_text.to(idx.device), neg_image.to(idx.device)
    has_text, has_image = has_text.to(idx.device), has_image.to(idx.device)
    # pairs: (image, caption) indices; positives, each image with its drawn caption, each caption
    # with its drawn image
    image_idx = torch.cat([idx, idx[has_text], neg_image[has_image]])
    text_idx = torch.cat([idx, neg_text[has_text], idx[has_image]])
    mask = text_mask[text_idx] if text_mask is not None else None
    logits = _logits(scorer, image_tokens[image_idx], text_tokens[text_idx], mask)
    labels = torch.zeros(image_idx.shape[0], dtype=torch.long, device=logits.device)
    labels[:b] = 1
    return ITMOutput(F.cross_entropy(logits.float(), labels), logits, labels)


class ITMLoss(nn.Module):
    """:func:`itm_loss` as a module, with an optional generator of its own (`seed`; None: torch's
    global one)."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed
        self._generator: torch.Generator | None = None

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def forward(self, scorer: _Scorer | nn.Module, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor | None, sim: torch.Tensor, image_ids: torch.Tensor,
                scale: float | torch.Tensor) -> ITMOutput:
        return itm_loss(scorer, image_tokens, text_tokens, text_mask, sim, image_ids, scale,
                        self._generator_for(sim.device))
