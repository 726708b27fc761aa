"""ALBEF's momentum encoder parts (Li et al. 2021, "Align before Fuse"): the EMA update of the
momentum model, and the image-text contrastive loss with feature queues and momentum distillation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unialign.losses.distributed import gather_no_grad, gather_with_grad, world_info
from unialign.losses.itc import soft_targets
from unialign.losses.memory_bank import MemoryBank


@torch.no_grad()
def ema_update_(momentum_params: Iterable[Tensor], params: Iterable[Tensor], momentum: float) -> None:
    """``p_m = momentum * p_m + (1 - momentum) * p`` for paired parameter lists, in place.

    Pairs whose student parameter is frozen are skipped: the copy started equal and the student
    never moves, so re-averaging would only add rounding."""
    pairs = [(pm, p) for pm, p in zip(momentum_params, params, strict=True) if p.requires_grad]
    if not pairs:
        return
    mine = [pm for pm, _ in pairs]
    # One multi-tensor kernel each, instead of a Python loop over hundreds of tensors.
    torch._foreach_mul_(mine, momentum)
    torch._foreach_add_(mine, [p.detach() for _, p in pairs], alpha=1.0 - momentum)


class MomentumContrastiveLoss(nn.Module):
    """Symmetric InfoNCE with ALBEF's feature queues and/or momentum distillation (MoD).

    With queues (``queue_size > 0``), local student images are scored against the momentum texts
    of the global batch followed by the text queue, and student texts against momentum images and
    the image queue (ALBEF: the candidates are momentum features, constants). Without queues the
    candidates are the student's own gathered batch, as in `ContrastiveLoss`: only the targets
    change (MoD alone).

    Targets: candidates with the row's image id are equal positives (`soft_targets`; queue entries
    included); without ids only the row's own pair, at index ``rank * B + i`` of the gathered batch.
    With ``alpha > 0`` they become ``(1 - alpha) * positives + alpha * softmax(s * m @ C_m.T)``, the
    momentum embedding ``m`` of the row scored against the momentum features ``C_m`` of the same
    candidates (momentum batch + queue), with the student's logit scale ``s``.

    Result on a rank: the mean over its local rows, so the single-process loss on the whole batch
    is the mean over ranks. With queues nothing differentiable is gathered and the local gradient
    is ``dL_r/ds = world_size * dL_full/ds``; without, the gather keeps autograd and gives the
    same (see `ContrastiveLoss`): DDP's averaging reproduces the big-batch gradient either way.

    In training mode the gathered momentum batch (rank 0's rows first) is enqueued after the loss
    with its image ids (``-1`` without ids: never a positive); every rank enqueues the same tensors,
    so the queues stay identical across ranks without extra communication.
    """

    step: Tensor

    def __init__(self, dim: int, queue_size: int) -> None:
        super().__init__()
        self.image_queue = MemoryBank(queue_size, dim)
        self.text_queue = MemoryBank(queue_size, dim)
        # Optimizer steps taken (for MoD's warm-up), in the checkpoint so a resume continues the ramp.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._host_step: int | None = 0  # host copy: reading the buffer each step would sync the device

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._host_step = None

    @property
    def steps_taken(self) -> int:
        if self._host_step is None:
            self._host_step = int(self.step.item())
        return self._host_step

    @torch.no_grad()
    def count_step_(self) -> None:
        self._host_step = self.steps_taken + 1
        self.step.add_(1)

    def forward(self, image: Tensor, text: Tensor, momentum_image: Tensor, momentum_text: Tensor,
                logit_scale: Tensor, image_ids: Tensor | None = None, alpha: float = 0.0) -> Tensor:
        """Loss for the local student's L2-normalised ``(B, D)`` embeddings and the momentum model's
        (normalised here, no gradient); ``alpha`` is MoD's weight at this step (0: hard targets)."""
        rank, _ = world_info()
        batch = image.shape[0]
        m_img = F.normalize(momentum_image.detach().float(), dim=-1)
        m_txt = F.normalize(momentum_text.detach().float(), dim=-1)
        all_m_img, all_m_txt = gather_no_grad(m_img), gather_no_grad(m_txt)
        q_img, q_ids = self.image_queue.valid()
        q_txt, _ = self.text_queue.valid()  # enqueued together: the same ids in the same order
        # The momentum features of every candidate (cat copies: safe against the enqueue below).
        cand_m_img = torch.cat([all_m_img, q_img.to(all_m_img)])
        cand_m_txt = torch.cat([all_m_txt, q_txt.to(all_m_txt)])
        if self.image_queue.size > 0:
            cand_img, cand_txt = cand_m_img, cand_m_txt
        else:
            cand_img, cand_txt = gather_with_grad(image), gather_with_grad(text)

        batch_ids = None if image_ids is None else gather_no_grad(image_ids)
        n_cand = cand_m_img.shape[0]
        if batch_ids is None:
            own = torch.arange(batch, device=image.device) + rank * batch
            positives = F.one_hot(own, n_cand).float()
        else:
            positives = soft_targets(image_ids, torch.cat([batch_ids, q_ids.to(batch_ids)]))
        # float32 logits: the softmax spans up to N + queue_size candidates.
        logits_i2t = (logit_scale * image @ cand_txt.T).float()
        logits_t2i = (logit_scale * text @ cand_img.T).float()
        targets_i2t = targets_t2i = positives
        if alpha > 0:
            with torch.no_grad():
                scale = logit_scale.detach().float()
                targets_i2t = (1 - alpha) * positives + alpha * F.softmax(scale * m_img @ cand_m_txt.T, dim=1)
                targets_t2i = (1 - alpha) * positives + alpha * F.softmax(scale * m_txt @ cand_m_img.T, dim=1)
        loss = (F.cross_entropy(logits_i2t, targets_i2t) + F.cross_entropy(logits_t2i, targets_t2i)) / 2

        if self.training:
            if batch_ids is None:
                batch_ids = torch.full((all_m_img.shape[0],), -1, dtype=torch.int64, device=all_m_img.device)
            self.image_queue.enqueue(all_m_img, batch_ids)
            self.text_queue.enqueue(all_m_txt, batch_ids)
        return loss
