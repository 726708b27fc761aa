"""The frozen self-supervised image teacher that gives distillation targets."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataConfig, TeacherConfig
from .towers import ImageTower, build_image_tower


class Teacher(nn.Module):
    """L2-normalised CLS of one block of a frozen ViT (paper: BEiTv2's last block, before the final norm).

    It is never trained: parameters do not require grad, `train()` keeps it in eval mode (no
    dropout, frozen norms), and the training module keeps it out of the optimizer and out
    of checkpoints, rebuilding it from the config instead.
    """

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        if cfg.block < -1:
            raise ValueError(f"teacher.block must be -1 (last) or a block index >= 0, got {cfg.block}")
        layers = None if cfg.block == -1 else cfg.block + 1  # blocks after the target one are never run
        self.backbone: ImageTower = build_image_tower(cfg.backend, cfg.name, cfg.pretrained, cfg.checkpoint,
                                                      layers, cfg.kwargs, keep_final_norm=cfg.after_norm)
        self.backbone.requires_grad_(False)
        self.eval()
        self.width = self.backbone.width

    def train_transform(self, data: DataConfig) -> Callable:
        """The teacher's own augmentation of the image, normalised with the teacher's statistics."""
        from ..data.transforms import build_image_transform

        stats = self.backbone.data_config
        return build_image_transform(data.image_size, stats.get("mean", data.mean), stats.get("std", data.std),
                                     train=True, scale=data.train_scale, interpolation=data.interpolation,
                                     hflip=data.hflip)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(pixels)[:, 0].float(), dim=-1)
