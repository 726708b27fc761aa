"""Training losses: image-text contrastive loss and teacher distillation losses."""

from unialign.losses.distributed import gather_no_grad, gather_with_grad, world_info
from unialign.losses.itc import ContrastiveLoss, soft_targets
from unialign.losses.kd import ContrastiveDistillationLoss, MSEDistillationLoss
from unialign.losses.memory_bank import MemoryBank

__all__ = [
    "ContrastiveDistillationLoss",
    "ContrastiveLoss",
    "MSEDistillationLoss",
    "MemoryBank",
    "gather_no_grad",
    "gather_with_grad",
    "soft_targets",
    "world_info",
]
