"""A distributed sampler whose order depends only on (seed, epoch) and that can resume mid-epoch."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import Sampler


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers: unlike ``seed + epoch``, (0, 1) and (1, 0) differ."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


@dataclass(eq=False)
class ResumableSampler(Sampler[int]):
    """DistributedSampler semantics plus :meth:`skip` for resuming inside an epoch.

    The permutation depends only on (seed, epoch); rank ``r`` takes positions
    ``r, r + world_size, ...`` of it, so the first ``n * world_size`` positions are exactly
    what all ranks consumed after ``n`` samples each. ``drop_last`` drops the tail that
    does not divide evenly across ranks, otherwise the permutation is padded with its own
    head. ``on_set_epoch`` lets a dataset follow the epoch (for per-epoch augmentation).
    """

    length: int
    shuffle: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False
    on_set_epoch: Callable[[int], None] | None = None
    epoch: int = field(default=0, init=False)
    _skip: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError(f"length must be >= 0, got {self.length}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        # drop_last rounds this rank's share down, otherwise up (padded in indices())
        self.num_samples = (self.length // self.world_size if self.drop_last
                            else -(-self.length // self.world_size))
        self.total_size = self.num_samples * self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_set_epoch is not None:
            self.on_set_epoch(epoch)

    def skip(self, n_samples: int) -> None:
        """Make the next iteration start after this rank's first ``n_samples`` indices (once)."""
        if not 0 <= n_samples <= self.num_samples:
            raise ValueError(f"can skip 0..{self.num_samples} samples on this rank, got {n_samples}")
        self._skip = n_samples

    def indices(self) -> list[int]:
        """This rank's full share for the current epoch."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        if self.total_size > len(order) and order:
            repeats = math.ceil((self.total_size - len(order)) / len(order))
            order += (order * repeats)[: self.total_size - len(order)]
        return order[self.rank: self.total_size: self.world_size]

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self._skip, 0
        return iter(self.indices()[start:])

    def __len__(self) -> int:
        # The full share even after skip(): Lightning keeps counting batches from where the
        # checkpoint left off and ends the epoch at len(dataloader).
        return self.num_samples
