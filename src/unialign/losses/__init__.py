"""Training losses: image-text contrastive loss and teacher distillation losses."""

from unialign.losses.distributed import gather_no_grad, gather_with_grad, world_info
from unialign.losses.itc import ContrastiveLoss, soft_targets
from unialign.losses.itm import ITMLoss, ITMOutput, itm_loss, sample_hard_negatives
from unialign.losses.kd import ContrastiveDistillationLoss, MSEDistillationLoss
from unialign.losses.memory_bank import MemoryBank

__all__ = [
    "ContrastiveDistillationLoss",
    "ContrastiveLoss",
    "ITMLoss",
    "ITMOutput",
    "MSEDistillationLoss",
    "MemoryBank",
    "gather_no_grad",
    "gather_with_grad",
    "itm_loss",
    "sample_hard_negatives",
    "soft_targets",
    "world_info",
]
