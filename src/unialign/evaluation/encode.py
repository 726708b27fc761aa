"""Batch encoding of image files and captions with a trained model, with progress and skip-and-count."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.images import load_image
from ..model.factory import TextTokenizer
from ..model.smke import SMKE

log = logging.getLogger(__name__)


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[str], preprocess: Callable) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.preprocess(load_image(self.paths[i])), ""
        except Exception as err:  # an unreadable file is reported, never fatal
            return i, None, f"{type(err).__name__}: {err}"


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, bad


@torch.no_grad()
def encode_images(model: SMKE, preprocess: Callable, paths: Sequence[str], batch_size: int = 64,
                  num_workers: int = 0, device: str | torch.device = "cpu",
                  progress: bool = True) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Embeddings of the readable images, their indices into `paths`, and the (path, reason) skipped."""
    loader = DataLoader(_ImageFiles(paths, preprocess), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    embeddings, kept, skipped = [], [], []
    for indices, pixels, bad in tqdm(loader, desc="images", unit="batch", disable=not progress):
        skipped.extend((paths[i], reason) for i, reason in bad)
        if pixels is None:
            continue
        embeddings.append(model.encode_image(pixels.to(device)).float().cpu())
        kept.extend(indices)
    for path, reason in skipped:
        log.warning("skipped image %s (%s)", path, reason)
    dim = model.width
    return (torch.cat(embeddings) if embeddings else torch.empty(0, dim)), kept, skipped


@torch.no_grad()
def encode_texts(model: SMKE, tokenizer: TextTokenizer, texts: Sequence[str], batch_size: int = 256,
                 device: str | torch.device = "cpu", progress: bool = True) -> torch.Tensor:
    out = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="texts", unit="batch", disable=not progress):
        tokens = {k: v.to(device) for k, v in tokenizer(list(texts[start:start + batch_size])).items()}
        out.append(model.encode_text(tokens).float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.width)
