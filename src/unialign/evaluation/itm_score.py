"""ITM match probabilities of (image file, caption) pairs with a unialign model's ITM head.

The head needs the shared block's whole output sequences, far larger than the embeddings (ViT-B:
197 x 768 floats an image), so nothing is kept for the whole gallery: the pairs are taken a
chunk of images at a time, each image's tokens computed once, and the captions those pairs need
are re-encoded per chunk, a batch at a time (text is the cheap side). Memory is bounded by
`image_chunk` image sequences plus `text_batch` caption sequences plus one batch of pairs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..model.factory import TextTokenizer
from ..model.itm import match_probability
from ..model.smke import SMKE
from .encode import _collate, _ImageFiles
from .specs import EvalError


def require_itm(model: object, what: str = "--rerank") -> SMKE:
    """The SMKE inside an eval model (or the SMKE itself) when it has an ITM head, else a one-line
    :class:`EvalError`."""
    smke = getattr(model, "model", model)
    name = getattr(model, "name", "the model")
    if not isinstance(smke, SMKE):
        raise EvalError(f"{what} needs a unialign checkpoint with an ITM head; {name} is not a unialign model")
    if smke.itm_head is None:
        raise EvalError(f"{what} needs a checkpoint with an ITM head (trained with model.itm: true); "
                        f"{name} has none")
    return smke


@torch.no_grad()
def text_tokens(model: SMKE, tokenizer: Callable, texts: Sequence[str],
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared block's output sequences (B, L, D) of `texts` and their padding mask (B, L)."""
    tokens = {k: v.to(device) for k, v in tokenizer(list(texts)).items()}
    emb = model.text_embeddings(tokens["input_ids"], tokens["attention_mask"])
    return emb.tokens, emb.mask


@torch.no_grad()
def itm_probabilities(model: SMKE, image_tokens: torch.Tensor, text_tok: torch.Tensor,
                      text_mask: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Match probability (P,) of P aligned (image sequence, text sequence) pairs, `batch_size` at a time."""
    out = [match_probability(model.itm_logits(image_tokens[s:s + batch_size], text_tok[s:s + batch_size],
                                              text_mask[s:s + batch_size]))
           for s in range(0, image_tokens.shape[0], batch_size)]
    return torch.cat(out).cpu() if out else torch.empty(0)


class ITMPairScorer:
    """Callable `evaluation.rerank.PairScorer`: (P, 2) (image index, caption index) -> P(match),
    indices into `image_paths` / `captions`."""

    def __init__(self, model: SMKE, preprocess: Callable, tokenizer: TextTokenizer | Callable,
                 image_paths: Sequence[str], captions: Sequence[str], device: torch.device | str = "cpu",
                 image_chunk: int = 128, text_batch: int = 256, pair_batch: int = 256, num_workers: int = 0,
                 progress: bool = False) -> None:
        if model.itm_head is None:
            raise EvalError("re-ranking needs a model with an ITM head (model.itm: true)")
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.image_paths, self.captions = list(image_paths), list(captions)
        self.device = device
        self.image_chunk, self.text_batch, self.pair_batch = image_chunk, text_batch, pair_batch
        self.num_workers, self.progress = num_workers, progress

    @torch.no_grad()
    def _image_tokens(self, indices: list[int]) -> torch.Tensor:
        paths = [self.image_paths[i] for i in indices]
        loader = DataLoader(_ImageFiles(paths, self.preprocess), batch_size=64,
                            num_workers=self.num_workers, collate_fn=_collate)
        out = []
        for _, pixels, bad in loader:
            if bad:  # it was readable when the embeddings were computed a moment ago
                raise EvalError(f"image {paths[bad[0][0]]} became unreadable during re-ranking ({bad[0][1]})")
            out.append(self.model.image_embeddings(pixels.to(self.device)).tokens)
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, pairs: torch.Tensor) -> torch.Tensor:
        pairs = pairs.cpu().long()
        scores = torch.empty(pairs.shape[0])
        images = pairs[:, 0].unique()
        chunks = range(0, images.numel(), self.image_chunk)
        for c0 in tqdm(chunks, desc="re-rank", unit="chunk", disable=not self.progress):
            chunk = images[c0:c0 + self.image_chunk]
            img_tok = self._image_tokens(chunk.tolist())
            row = torch.full((int(chunk.max()) + 1,), -1, dtype=torch.long)
            row[chunk] = torch.arange(chunk.numel())
            in_chunk = torch.nonzero(torch.isin(pairs[:, 0], chunk)).flatten()
            caps = pairs[in_chunk, 1].unique()
            for t0 in range(0, caps.numel(), self.text_batch):
                batch = caps[t0:t0 + self.text_batch]
                txt_tok, mask = text_tokens(self.model, self.tokenizer, [self.captions[i] for i in batch.tolist()],
                                            self.device)
                col = torch.full((int(batch.max()) + 1,), -1, dtype=torch.long)
                col[batch] = torch.arange(batch.numel())
                sel = in_chunk[torch.isin(pairs[in_chunk, 1], batch)]
                rows = row[pairs[sel, 0]].to(img_tok.device)
                cols = col[pairs[sel, 1]].to(txt_tok.device)
                for s0 in range(0, sel.numel(), self.pair_batch):
                    r, c = rows[s0:s0 + self.pair_batch], cols[s0:s0 + self.pair_batch]
                    scores[sel[s0:s0 + self.pair_batch]] = itm_probabilities(
                        self.model, img_tok[r], txt_tok[c], mask[c], self.pair_batch)
        return scores
