"""Batch encoding of image files and captions with a trained model, with progress and skip-and-count."""

from __future__ import annotations

import hashlib
import logging
import pickle
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.images import load_image
from ..files import hash_tensor
from ..model.factory import TextTokenizer
from ..model.smke import SMKE
from ..model.towers import frozen_blocks, layer_depth

log = logging.getLogger(__name__)


class PixelMemo:
    """What several models scored on one set can share: the preprocessed pixels of each file (for every
    model with the same preprocessing) and the output of frozen image blocks (for every unialign model
    whose first blocks have the same weights, the demo's S-SMKE, no-KD and frozen-towers rows).

    Pixels are keyed by a digest of the pickled transform (every step and its parameters) and the path;
    a transform that cannot be pickled (a lambda) is not memoized. Unreadable files are remembered
    with their reason. Memory: 3 x size x size floats a file (150 KB at 112 px), tokens x width floats a
    file for a frozen prefix (100 KB with ViT-S/14 at 112 px). Worth it where files are large against the
    model's input (the demo's Open Clip Art PNGs of up to 1,500 px took longer to decode and resize than
    the model took to encode at 112 px) and where frozen blocks are most of the image tower (6 of 8).
    """

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, torch.Tensor | str]] = {}  # key -> path -> pixels or reason
        self.prefixes: dict[str, dict[str, torch.Tensor]] = {}  # ImagePrefix digest -> path -> tokens

    @staticmethod
    def key(preprocess: Callable) -> str | None:
        try:
            return hashlib.sha256(pickle.dumps(preprocess)).hexdigest()
        except Exception:  # pickle raises several kinds for objects it cannot handle
            return None


class _ImagePrefix:
    """A unialign model's image side split after its frozen blocks, with the memo's tokens for it.

    `digests[d]` names the tower's input side and first d blocks by their weights and the preprocessing,
    so a model finds the tokens another model stored after the same blocks: its own `frozen` (kept after
    them), or fewer (lookups take the deepest stored)."""

    def __init__(self, model: SMKE, pixels_key: str, memo: PixelMemo) -> None:
        self.model, self.memo = model, memo
        tower = model.image_tower
        self.frozen = frozen_blocks(tower, tower.num_blocks)
        by_depth: dict[int, list[torch.Tensor]] = {}
        for name, t in tower.state_dict().items():
            by_depth.setdefault(layer_depth(name, tower.num_blocks), []).append(t)
        digest = hashlib.sha256(pixels_key.encode())
        self.digests = []
        for depth in range(self.frozen + 1):
            for t in by_depth.get(depth, []):
                hash_tensor(digest, t)
            self.digests.append(digest.copy().hexdigest())

    def encode(self, pixels: torch.Tensor, paths: list[str]) -> torch.Tensor:
        """`model.encode_image(pixels)`, starting from the deepest stored prefix of every path in `paths`."""
        tower = self.model.image_tower
        for depth in range(self.frozen, 0, -1):
            stored = self.memo.prefixes.get(self.digests[depth], {})
            if all(p in stored for p in paths):
                tokens = torch.stack([stored[p] for p in paths]).to(pixels.device)
                break
        else:
            depth, tokens = self.frozen, tower.forward_prefix(pixels, self.frozen)
            self.memo.prefixes.setdefault(self.digests[depth], {}).update(zip(paths, tokens.cpu()))
        return self.model.embed_image_tokens(tower.forward_suffix(tokens, depth)).embedding

    @classmethod
    def of(cls, model: Any, pixels_key: str | None, memo: PixelMemo | None) -> "_ImagePrefix | None":
        """For a unialign model (or its `EvalModel`) with frozen image blocks and a splittable tower."""
        smke = getattr(model, "model", model)
        if memo is None or pixels_key is None or not isinstance(smke, SMKE) or smke.image_tower.split_error():
            return None
        tower = smke.image_tower
        return cls(smke, pixels_key, memo) if frozen_blocks(tower, tower.num_blocks) else None


class _ImageFiles(Dataset):
    """`known`: the memo's entries under this preprocessing's key, by path."""

    def __init__(self, paths: Sequence[str], preprocess: Callable,
                 known: dict[str, torch.Tensor | str] | None = None) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.known = {} if known is None else known

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        kept = self.known.get(self.paths[i])
        if kept is not None:
            return (i, None, kept) if isinstance(kept, str) else (i, kept, "")
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
                  num_workers: int = 0, device: str | torch.device = "cpu", progress: bool = True,
                  memo: PixelMemo | None = None) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Embeddings of the readable images, their indices into `paths`, and the (path, reason) skipped.
    `memo`: preprocessed pixels (and a unialign model's frozen image blocks' output) are read from it
    where there, and kept in it."""
    key = None if memo is None else memo.key(preprocess)
    known = {} if key is None else memo.entries.setdefault(key, {})  # type: ignore[union-attr]
    prefix = _ImagePrefix.of(model, key, memo)
    loader = DataLoader(_ImageFiles(paths, preprocess, known), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    embeddings, kept, skipped = [], [], []
    for indices, pixels, bad in tqdm(loader, desc="images", unit="batch", disable=not progress):
        skipped.extend((paths[i], reason) for i, reason in bad)
        if key is not None:  # kept here, not in the dataset: loader workers hold copies of it
            known.update({paths[i]: reason for i, reason in bad})
            known.update({paths[i]: x for i, x in zip(indices, pixels if pixels is not None else [])})
        if pixels is None:
            continue
        pixels = pixels.to(device)
        out = model.encode_image(pixels) if prefix is None else prefix.encode(pixels, [paths[i] for i in indices])
        embeddings.append(out.float().cpu())
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
