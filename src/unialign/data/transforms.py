"""Image transforms for the student (and, with other statistics, for a teacher)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def build_image_transform(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                          scale: tuple[float, float] = (0.9, 1.0), interpolation: str = "bicubic",
                          hflip: bool = True) -> v2.Compose:
    """PIL image -> normalised float tensor (3, image_size, image_size).

    Training uses a mild random resized crop (captions describe the whole picture, so
    aggressive crops would cut out what the text mentions). ``hflip=False`` suits captions
    that say "left"/"right". Evaluation squashes to a square instead of centre-cropping, so
    nothing a caption mentions is cut off.
    """
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
    mode = _INTERPOLATION[interpolation]
    if train:
        geometry: list[v2.Transform] = [
            v2.RandomResizedCrop(image_size, scale=scale, interpolation=mode, antialias=True)]
        if hflip:
            geometry.append(v2.RandomHorizontalFlip())
    else:
        geometry = [v2.Resize((image_size, image_size), interpolation=mode, antialias=True)]
    return v2.Compose([
        *geometry,
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])
