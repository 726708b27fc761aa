"""Image decoding shared by every source (files and shard members alike)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from unialign.data.records import DataError

_WHITE = (255, 255, 255, 255)

# What counts as an image file wherever a folder is walked for images (`embed`, `index build`,
# class-folder datasets): PIL decodes all of these.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class ImageLoadError(DataError):
    """An image that is missing, unreadable or not decodable."""


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode fully to RGB; transparent pixels are composited onto white.

    Web images (CC3M/CC12M) often carry alpha; a plain ``convert("RGB")`` would expose
    whatever colour the invisible pixels happen to hold (usually black). ``name`` only
    labels error messages for in-memory bytes.
    """
    label = name or (f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source))
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()  # decode now, so truncated files fail here and not inside a transform
            if _has_transparency(img):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, _WHITE)
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"{label}: cannot decode image ({type(err).__name__}: {err})") from None
