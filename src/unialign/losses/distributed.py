"""Cross-rank gathering for losses that need the global batch.

Every helper degrades to the identity on a single process (no process group,
or world size 1), so the same loss code runs on one CPU, one GPU or many GPUs.
All ranks must pass tensors of identical shape (equal per-rank batch), which is
what a ``drop_last`` distributed sampler guarantees.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def world_info() -> tuple[int, int]:
    """Return ``(rank, world_size)``; ``(0, 1)`` when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping autograd to every rank.

    The backward pass sums, over ranks, the gradients flowing into this rank's
    slice, so the local gradient is ``d(sum_r L_r)/dx`` (see ``ContrastiveLoss``).
    """
    _, world = world_info()
    if world == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0 as a constant (frozen teacher, ids)."""
    _, world = world_info()
    x = x.detach()
    if world == 1:
        return x
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)
