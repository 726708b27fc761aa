"""Image-text contrastive (CLIP-style InfoNCE) loss over the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unialign.losses.distributed import gather_no_grad, gather_with_grad, world_info


def soft_targets(row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """Uniform target distribution over all columns sharing the row's image id.

    Captions of the same image are true matches; treating them as negatives
    (the original implementation) pushes apart pairs that should align.
    Every row must have at least one matching column (its own pair), otherwise
    the row is NaN. Ids must be non-negative; ``-1`` is reserved for "unknown".

    Returns a float32 ``(len(row_ids), len(col_ids))`` matrix with rows summing to 1.
    """
    mask = (row_ids[:, None] == col_ids[None, :]).float()
    return mask / mask.sum(dim=1, keepdim=True)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between local rows and the gathered global batch.

    Each rank scores its local images (texts) against all texts (images) of all
    ranks and returns the mean over its *local* rows, ``L_r``. With equal
    per-rank batches the single-process loss on the concatenated batch equals
    ``mean_r L_r``. Because the gather keeps autograd, the gradient a rank gets
    for its local features is ``d(sum_r L_r)/df = world_size * dL_full/df``;
    DDP's averaging of parameter gradients over ranks then yields exactly
    ``dL_full/dtheta``, i.e. training matches one big-batch process.
    """

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        image_ids: Tensor | None = None,
    ) -> Tensor:
        """Compute the loss for L2-normalised ``(B, D)`` features.

        ``logit_scale`` is the already exponentiated/clamped multiplier of the
        cosine similarities. ``image_ids`` (``(B,)`` int64) marks pairs sharing an
        image so they count as positives; ``None`` means all pairs are distinct.
        """
        rank, _ = world_info()
        batch = image_features.shape[0]
        all_images = gather_with_grad(image_features)
        all_texts = gather_with_grad(text_features)
        # float32 softmax: cheap at (B, N) and avoids bf16 targets/logit mismatch.
        logits_i2t = (logit_scale * image_features @ all_texts.T).float()
        logits_t2i = (logit_scale * text_features @ all_images.T).float()
        if image_ids is None:
            targets = torch.arange(batch, device=image_features.device) + rank * batch
        else:
            targets = soft_targets(image_ids, gather_no_grad(image_ids))
        return (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets)) / 2
