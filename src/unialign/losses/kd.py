"""Knowledge-distillation losses from a frozen teacher to the student KD heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unialign.losses.distributed import gather_no_grad, world_info
from unialign.losses.itc import soft_targets
from unialign.losses.memory_bank import MemoryBank

_MAX_LOG_INV_TEMPERATURE = math.log(100.0)


class ContrastiveDistillationLoss(nn.Module):
    """Contrastive distillation against the gathered teacher batch plus a memory bank.

    Each student row (image and caption views) must pick its own teacher target
    among ``[gathered batch targets ; valid bank entries]``; with ``image_ids``
    every candidate of the same image is an equal positive. The result on a rank
    is the mean over its local rows, ``L_r``: the single-process loss on the
    concatenated batch is ``mean_r L_r``, and the local student gradient is
    ``dL_r/ds = world_size * dL_full/ds`` (student outputs are not gathered),
    so DDP's gradient averaging reproduces the big-batch gradient.

    In training mode the gathered batch targets are enqueued *after* the loss,
    in rank order (rank 0's rows first); every rank enqueues the same tensor,
    so banks stay identical across ranks without extra communication.
    """

    log_inv_temperature: Tensor

    def __init__(
        self,
        dim: int,
        bank_size: int = 65536,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
    ) -> None:
        super().__init__()
        self.bank = MemoryBank(bank_size, dim)
        self.learnable_temperature = learnable_temperature
        init = torch.full((1,), math.log(1.0 / temperature), dtype=torch.float32)  # (1,): FSDP shards no 0-d
        if learnable_temperature:
            self.log_inv_temperature = nn.Parameter(init)
        else:
            # Not persisted: a fixed temperature belongs to the config, not the checkpoint.
            self.register_buffer("log_inv_temperature", init, persistent=False)

    def logit_scale(self) -> Tensor:
        """``1 / temperature``; a learnable one stays in ``[1, 100]`` through `clamp_temperature_`."""
        return self.log_inv_temperature.exp()

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamp a learnable temperature's parameter after each optimiser step (not in the graph,
        where a value past the cap would get a zero gradient for good)."""
        if self.learnable_temperature:
            self.log_inv_temperature.clamp_(0.0, _MAX_LOG_INV_TEMPERATURE)

    def forward(self, student_image: Tensor, student_text: Tensor, teacher_targets: Tensor,
                image_ids: Tensor | None = None) -> Tensor:
        """Loss for ``(B, D)`` student outputs and teacher targets (normalised here)."""
        rank, _ = world_info()
        batch = teacher_targets.shape[0]
        # float32 throughout: the softmax spans up to N + 65536 candidates.
        s_img = F.normalize(student_image.float(), dim=-1)
        s_txt = F.normalize(student_text.float(), dim=-1)
        batch_targets = gather_no_grad(F.normalize(teacher_targets.float(), dim=-1))
        bank_targets, bank_ids = self.bank.valid()
        candidates = torch.cat([batch_targets, bank_targets.to(batch_targets)])
        scale = self.logit_scale()

        if image_ids is None:
            batch_ids = None
            targets = torch.arange(batch, device=s_img.device) + rank * batch
        else:
            batch_ids = gather_no_grad(image_ids)
            targets = soft_targets(image_ids, torch.cat([batch_ids, bank_ids.to(batch_ids)]))

        loss_img = F.cross_entropy(scale * s_img @ candidates.T, targets)
        loss_txt = F.cross_entropy(scale * s_txt @ candidates.T, targets)

        if self.training:
            if batch_ids is None:
                batch_ids = torch.full(
                    (batch_targets.shape[0],), -1, dtype=torch.int64, device=batch_targets.device
                )
            self.bank.enqueue(batch_targets, batch_ids)
        return (loss_img + loss_txt) / 2


class MSEDistillationLoss(nn.Module):
    """Feature-regression alternative: MSE between L2-normalised student and teacher.

    Uses ``F.mse_loss`` with mean reduction (mean over batch *and* dimensions),
    so the scale is ``||s - t||^2 / D`` per row. Purely local (no gather): the
    DDP-averaged gradient already equals the big-batch gradient.
    """

    def forward(self, student_image: Tensor, student_text: Tensor, teacher_targets: Tensor,
                image_ids: Tensor | None = None) -> Tensor:
        """Return ``(MSE(image) + MSE(text)) / 2``; ``image_ids`` is accepted for API parity."""
        target = F.normalize(teacher_targets.detach().float(), dim=-1)
        loss_img = F.mse_loss(F.normalize(student_image.float(), dim=-1), target)
        loss_txt = F.mse_loss(F.normalize(student_text.float(), dim=-1), target)
        return (loss_img + loss_txt) / 2
