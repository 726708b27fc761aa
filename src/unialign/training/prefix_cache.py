"""The towers' frozen prefixes, computed once per training image or caption
(``train.cache_frozen_image``, ``train.cache_frozen_text``).

With the input side and the first N blocks of a tower frozen (``model.*.freeze_layers``), they run
in eval mode and map an input to the same tokens at every epoch: a caption always, an image when the
training views are not augmented (``data.train_scale: [1, 1]``, ``data.hflip: false``: the
resize-crop at scale 1 is then a fixed function of the image). The cache keeps their output, by
image id or by the caption's tokens, the first time it is computed; every later step runs only the
layers above it, so from the second epoch on the frozen layers cost nothing. On small data (the
demo: five passes over ~740 pairs, 6 of 8 image blocks and 3 of 6 text layers frozen) that is most
of the towers' forward pass.

Lookup is planned on the host before the batch moves to the device (which rows each sample reads,
which samples fill theirs), so a step makes no device sync. The store lives on the training device
and holds entries x tokens x width values (float32 with ViT-S/14: ~26 KB an image at 56 px, ~400 KB
at 224 px; a caption: max_length x width); it is not saved in checkpoints (a resumed run fills it
again, with the same values).

Several runs over the same data with the same frozen prefix (the demo's table: S-SMKE, no KD and the
Hugging Face baseline share the pretrained image blocks) can share one cache, inside
`shared_prefix_caches()`; outside it each run has its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ..files import hash_tensor

if TYPE_CHECKING:
    from ..config import Config


class FrozenPrefixCache:
    """A tower's tokens after its first `n_blocks` blocks, by input (image id, caption tokens).

    `length`: the longest sequence stored (captions: padded batches of varying length up to
    model.text.max_length); None: every entry has the first one's length (images)."""

    def __init__(self, n_blocks: int, length: int | None = None) -> None:
        self.n_blocks = n_blocks
        self.length = length
        self.rows: dict[Hashable, int] = {}  # input -> row of `store`, assigned when first planned
        self.store: torch.Tensor | None = None  # (capacity, length, width)

    def plan(self, keys: Sequence[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
        """On the host: each sample's row, and the positions of the samples that fill theirs in this
        step (the first sample of each input not seen before)."""
        rows, fill = [], []
        for position, key in enumerate(keys):
            row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = len(self.rows)
                fill.append(position)
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(fill, dtype=torch.long)

    def read(self, prefix: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, fill: torch.Tensor,
             length: int | None = None) -> torch.Tensor:
        """The stored prefix of every sample of a planned batch (B, length, width): first
        `prefix(fill)` (the frozen layers' output for those samples) is computed and stored."""
        if fill.numel():
            with torch.no_grad():
                new = prefix(fill)
            self._grow(len(self.rows), new)
            self.store[rows[fill], : new.shape[1]] = new.to(self.store.dtype)
        if self.store is None:
            raise RuntimeError("the frozen-prefix cache is empty: a batch read rows no step has filled")
        if self.store.device != rows.device:  # shared with a run on another device
            self.store = self.store.to(rows.device)
        return self.store[rows] if length is None else self.store[rows, :length]

    def _grow(self, needed: int, like: torch.Tensor) -> None:
        """Room for `needed` rows (capacity doubles, so growing costs one copy per doubling). Zeros
        where a shorter caption was stored: finite, and only ever at its padding positions."""
        if self.store is not None and self.store.shape[0] >= needed:
            return
        old = self.store
        capacity = max(needed, 2 * (0 if old is None else old.shape[0]))
        length = self.length or like.shape[1]
        self.store = like.new_zeros((capacity, length, like.shape[2]))
        if old is not None:
            self.store[: old.shape[0]] = old


_shared: dict[str, FrozenPrefixCache] | None = None  # inside `shared_prefix_caches`: digest -> cache


@contextmanager
def shared_prefix_caches() -> Iterator[None]:
    """Runs started within share one cache per frozen prefix (`frozen_prefix_cache`), so that a
    comparison of several models over the same data computes each frozen prefix once."""
    global _shared
    outer, _shared = _shared, {}
    try:
        yield
    finally:
        _shared = outer


def frozen_prefix_cache(n_blocks: int, length: int | None, tensors: Iterable[torch.Tensor],
                        inputs: Any) -> FrozenPrefixCache:
    """The cache of a run's frozen prefix: a new one, or within `shared_prefix_caches` the one of an
    earlier run with the same prefix (`shared_prefix_cache`)."""
    return shared_prefix_cache(n_blocks, length, tensors, inputs) or FrozenPrefixCache(n_blocks, length)


def shared_prefix_cache(n_blocks: int, length: int | None, tensors: Iterable[torch.Tensor],
                        inputs: Any) -> FrozenPrefixCache | None:
    """Within `shared_prefix_caches`, the cache of every run with this prefix: the same `tensors` (the
    frozen weights and buffers, by value and in order, whatever their names) and the same `inputs`
    (JSON: what decides the prefix's input for a key, such as the data config and the precision).
    None outside it."""
    if _shared is None:
        return None
    digest = hashlib.sha256(json.dumps([n_blocks, length, inputs], sort_keys=True, default=str).encode())
    for t in tensors:
        hash_tensor(digest, t)
    return _shared.setdefault(digest.hexdigest(), FrozenPrefixCache(n_blocks, length))


def image_prefix_inputs(cfg: Config) -> list[Any]:
    """What maps an image id to a frozen image prefix's input and its dtype: the data config (its sources
    number the images; its view makes the pixels) and the precision."""
    return [cfg.data.model_dump(mode="json"), cfg.train.precision]
