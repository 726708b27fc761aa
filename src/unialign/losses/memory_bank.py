"""FIFO memory bank of frozen-teacher targets used as extra KD candidates."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MemoryBank(nn.Module):
    """Ring buffer of the last ``size`` teacher targets and their image ids.

    State lives in registered buffers so checkpoints resume the bank exactly.
    Only entries actually enqueued are ever exposed (``count`` tracks them): the
    original bank started with random vectors that acted as fake negatives.
    ``size == 0`` gives an always-empty bank (in-batch distillation only).
    """

    targets: Tensor
    image_ids: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"bank size must be >= 0, got {size}")
        self.size = size
        self.dim = dim
        self.register_buffer("targets", torch.zeros(size, dim, dtype=torch.float32))
        self.register_buffer("image_ids", torch.full((size,), -1, dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        # Host copies of (count, ptr), so the training step never reads a device scalar (a
        # host sync). The buffers stay the checkpointed truth: loading a state dict drops the
        # copies and the next use reads the buffers once.
        self._host: tuple[int, int] | None = (0, 0)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None

    def _count_ptr(self) -> tuple[int, int]:
        if self._host is None:
            self._host = (int(self.count.item()), int(self.ptr.item()))
        return self._host

    def __len__(self) -> int:
        return self._count_ptr()[0]

    def valid(self) -> tuple[Tensor, Tensor]:
        """Return ``(targets, image_ids)`` of the valid entries, oldest first.

        Avoids copying whenever storage order already is age order (bank not
        yet full, or write pointer at slot 0), so the result may alias the
        buffers: treat it as read-only and consume it before the next enqueue.
        """
        count, ptr = self._count_ptr()
        if count < self.size:
            return self.targets[:count], self.image_ids[:count]
        if ptr == 0:
            return self.targets, self.image_ids
        order = torch.arange(ptr, ptr + self.size, device=self.targets.device) % self.size
        return self.targets[order], self.image_ids[order]

    @torch.no_grad()
    def enqueue(self, targets: Tensor, image_ids: Tensor) -> None:
        """Append ``(n, dim)`` targets, overwriting the oldest entries when full.

        Writes wrap around the end of the buffer; if ``n > size`` only the last
        ``size`` rows are kept, so the result equals enqueuing them one by one.
        Slot indices are computed on-device to avoid a host sync.
        """
        n = targets.shape[0]
        if self.size == 0 or n == 0:
            return
        count, ptr = self._count_ptr()
        self._host = (min(count + n, self.size), (ptr + n) % self.size)
        kept = min(n, self.size)
        offsets = torch.arange(n - kept, n, device=self.ptr.device)
        slots = (self.ptr + offsets) % self.size
        self.targets.index_copy_(0, slots, targets[n - kept :].detach().to(self.targets))
        self.image_ids.index_copy_(0, slots, image_ids[n - kept :].to(self.image_ids))
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.copy_(torch.clamp(self.count + n, max=self.size))
