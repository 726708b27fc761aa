"""The image tower's frozen prefix, computed once per training image (``train.cache_frozen_image``).

With the input side and the first N blocks of the image tower frozen (``model.image.freeze_layers``)
and training views that are not augmented (``data.train_scale: [1, 1]``, ``data.hflip: false``), those
layers map an image to the same tokens at every epoch: they run in eval mode, and the resize-crop
at scale 1 is a fixed function of the image. The cache keeps their output by image id the first time
an image is seen; every later step runs only the blocks above it, so from the second epoch on the
frozen blocks cost nothing. On small data (the demo: 115 steps, five passes over ~740 pairs, 6 of 8
blocks frozen) that is most of the image tower's forward pass.

Lookup is planned on the host before the batch moves to the device (which rows each sample reads,
which samples fill theirs), so a step makes no device sync. The store lives on the training device
and holds images x tokens x width values (float32 with ViT-S/14: ~26 KB an image at 56 px, ~400 KB
at 224 px); it is not saved in checkpoints (a resumed run fills it again, with the same values).
"""

from __future__ import annotations

import torch

from ..model.towers import ImageTower


class FrozenPrefixCache:
    """Tokens after the first `n_blocks` blocks of the image tower, by training image id."""

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = n_blocks
        self.rows: dict[int, int] = {}  # image id -> row of `store`, assigned when first planned
        self.store: torch.Tensor | None = None  # (capacity, tokens, width)

    def plan(self, image_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """On the host: each sample's row (`prefix_rows`) and the positions of the samples that fill
        theirs in this step (`prefix_fill`: the first sample of each image not seen before)."""
        rows, fill = [], []
        for position, image_id in enumerate(image_ids.tolist()):
            row = self.rows.get(image_id)
            if row is None:
                row = self.rows[image_id] = len(self.rows)
                fill.append(position)
            rows.append(row)
        return {"prefix_rows": torch.tensor(rows, dtype=torch.long),
                "prefix_fill": torch.tensor(fill, dtype=torch.long)}

    def tokens(self, tower: ImageTower, pixels: torch.Tensor, rows: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """The tower's output for a planned batch: the prefix of the new images is computed and
        stored, then every sample's stored prefix goes through the blocks above it."""
        if fill.numel():
            with torch.no_grad():
                new = tower.forward_prefix(pixels[fill], self.n_blocks)
            self._grow(len(self.rows), new)
            self.store[rows[fill]] = new.to(self.store.dtype)
        if self.store is None:
            raise RuntimeError("the frozen-prefix cache is empty: a batch read rows no step has filled")
        return tower.forward_suffix(self.store[rows], self.n_blocks)

    def _grow(self, needed: int, like: torch.Tensor) -> None:
        """Room for `needed` rows (capacity doubles, so growing costs one copy per doubling)."""
        if self.store is not None and self.store.shape[0] >= needed:
            return
        old = self.store
        capacity = max(needed, 2 * (0 if old is None else old.shape[0]))
        self.store = like.new_empty((capacity, *like.shape[1:]))
        if old is not None:
            self.store[: old.shape[0]] = old
