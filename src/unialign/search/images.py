"""Decoding images for the service at reduced size, a bounded number at a time, and a thumbnail
cache that builds each thumbnail once: what keeps the server's memory small (docs/SEARCH.md)."""

import ctypes
import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from PIL import Image

from ..data.images import ImageLoadError

_WHITE = (255, 255, 255, 255)
_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD = 1024 * 1024


class TooManyPixels(ValueError):
    """An image whose smallest decodable size is still above the decode cap."""


def decode_reduced(source: str | io.BytesIO, box: tuple[int, int], max_decode_pixels: int, label: str,
                   formats: Sequence[str] | None = None) -> Image.Image:
    """RGB image fitting in ``box`` (aspect kept; smaller images are not enlarged), decoded at
    reduced size where the format allows it (JPEG: DCT scaling to 1/2, 1/4 or 1/8 via
    ``Image.draft``) and never at more than ``max_decode_pixels``. Transparent pixels are
    composited onto white, like `unialign.data.images.load_image`.

    Raises TooManyPixels, ImageLoadError, or PIL's errors for a file PIL cannot open."""
    with Image.open(source, formats=formats) as img:
        width, height = img.size
        scale = min(1.0, box[0] / width, box[1] / height)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        if img.format == "JPEG" and scale < 1.0:
            img.draft("RGB", target)  # the smallest DCT scale still at least `target`
        if img.size[0] * img.size[1] > max_decode_pixels:
            raise TooManyPixels(f"{label}: {width}x{height} pixels; decoding it needs {img.size[0]}x{img.size[1]}, "
                                f"more than the {max_decode_pixels:,} pixels allowed")
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageLoadError(f"{label}: cannot decode image ({type(err).__name__}: {err})") from None
        alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
        mode = "RGBA" if alpha else "RGB"
        image = img if img.mode == mode else img.convert(mode)  # no full-size copy when already RGB
        image.thumbnail(target, Image.Resampling.BICUBIC, reducing_gap=2.0)  # reduce(), then resample
    if alpha:
        image = Image.alpha_composite(Image.new("RGBA", image.size, _WHITE), image).convert("RGB")
    return image


def return_freed_images_to_the_os() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD, so that every large buffer (a decoded image
    is one of 16 MB blocks) is mmap'ed and goes back to the OS when freed. By default glibc raises
    the threshold after the first such free, later buffers come from per-thread malloc arenas,
    and those keep freed memory resident: bursts of 24 concurrent 40-Mpixel uploads left the
    server 2.3 GB larger (docs/SEARCH.md). False when the C library is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def upload_box(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The box an uploaded image is reduced into: at most ``max_pixels``, aspect ratio kept."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


class DecodeSlots:
    """At most ``n`` image decodes at a time across the app (thumbnails and uploads)."""

    def __init__(self, n: int) -> None:
        self._sem = threading.BoundedSemaphore(max(1, n))

    def __enter__(self) -> None:
        self._sem.acquire()

    def __exit__(self, *exc: object) -> None:
        self._sem.release()


class ThumbnailCache:
    """LRU of JPEG thumbnails. One build per key at a time: concurrent callers for a key that is
    being built wait for it and get the cached bytes instead of decoding the image again."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[tuple[str, int, int], list] = {}  # key -> [lock, waiters]

    def get(self, key: tuple[str, int, int], build: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            entry = self._building.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                with self._lock:
                    if key in self._data:
                        return self._data[key]
                data = build()
                with self._lock:
                    self._data[key] = data
                    while len(self._data) > self.size:
                        self._data.popitem(last=False)
                return data
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    self._building.pop(key, None)
