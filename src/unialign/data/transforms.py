"""Image transforms for the student (and, with other statistics, for a teacher)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def takes_whole_image(scale: Sequence[float]) -> bool:
    """Whether a training crop's area range `scale` asks for the whole image: (1, 1) is the evaluation
    view (squashed to a square), not a RandomResizedCrop, which would centre-crop an image whose
    aspect ratio lies outside [3/4, 4/3] (and move a full-size crop of others by a pixel between
    draws). The host transform and the device-decode planner both follow this rule."""
    return tuple(scale) == (1.0, 1.0)


def build_image_transform(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                          scale: tuple[float, float] = (0.9, 1.0), interpolation: str = "bicubic",
                          hflip: bool = True, normalize: bool = True,
                          color_jitter: tuple[float, float, float] | None = None) -> v2.Compose:
    """PIL image -> normalised float tensor (3, image_size, image_size).

    ``normalize=False`` stops at the uint8 tensor; :class:`PixelNormalizer` finishes the job
    on a whole batch, typically on the GPU after the copy.

    Training uses a mild random resized crop (captions describe the whole picture, so
    aggressive crops would cut out what the text mentions); ``scale=(1, 1)`` takes the whole image,
    squashed to a square as evaluation does. ``hflip=False`` suits captions
    that say "left"/"right". Evaluation squashes to a square instead of centre-cropping, so
    nothing a caption mentions is cut off.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    mode = INTERPOLATIONS[interpolation]
    whole = [v2.Resize((image_size, image_size), interpolation=mode, antialias=True)]
    if train:
        # the same view at every epoch, which the caches rely on
        geometry: list[v2.Transform] = whole if takes_whole_image(scale) else [
            v2.RandomResizedCrop(image_size, scale=scale, interpolation=mode, antialias=True)]
        if hflip:
            geometry.append(v2.RandomHorizontalFlip())
        if color_jitter is not None:
            brightness, contrast, saturation = color_jitter
            geometry.append(v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation))
    else:
        geometry = whole
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose([*geometry, v2.ToImage(), *(to_float if normalize else [])])


class PixelNormalizer:
    """uint8 images (..., 3, H, W) -> normalised float32, on the device they are on.

    The same operations in the same order as ``ToDtype(scale=True)`` + ``Normalize`` of
    :func:`build_image_transform`, so the values are identical; float input is taken as
    already normalised and returned as is. Mean and std are kept per device so no call
    copies them from the host (no sync inside a training step).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():
            return images
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 or already normalised float images, got {images.dtype}")
        if images.device not in self._on_device:
            self._on_device[images.device] = (self.mean.to(images.device), self.std.to(images.device))
        mean, std = self._on_device[images.device]
        return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)
