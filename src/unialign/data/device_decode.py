"""``data.decode: device``: JPEGs are decoded and augmented on the training device.

A CPU core decodes and augments a few hundred 500x375 JPEGs per second, so a 16-core GPU
host cannot feed the ~6,300 pairs/s of a one-hour run of the paper's recipe. Here the loader workers only
read each JPEG's header and draw its crop and flip (seeded per sample, like the host path);
the compressed bytes travel with the batch, and after the copy the whole batch is decoded
at once by ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA) and cropped,
resized and flipped there.

What stays on the host: images that are not JPEG (PNG, WebP) or are CMYK JPEGs, which go
through the normal host transform, and any JPEG the device decoder rejects, which is decoded
by PIL as a fallback (in the main process: rare by construction). A JPEG that PIL cannot
decode either is dropped from the batch and counted like any other bad sample.

Values differ slightly from the host path (torch's antialiased bicubic instead of PIL's, and
a different JPEG decoder), so this is a choice of the run, not a drop-in identity.

On CUDA the decode and crops run on a side stream of their own. torchvision's nvJPEG decoder
allocates its outputs from the *current* stream's memory pool but writes them from a private
stream that never waits for the current one (torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp;
pytorch/vision#9606 reproduces the corruption on an H100). Called on the training stream, it
can be handed a block that the previous step's queued kernels still read, and overwrite it.
On the side stream every block it can be handed is idle: the side stream's own earlier work is
waited for first (one short host wait, normally already finished), and the images passed to
the training stream are marked as used there (``record_stream``), so the allocator keeps
them until the training stream is done with them.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from unialign.data.images import ImageLoadError, load_image
from unialign.data.transforms import INTERPOLATIONS, takes_whole_image

JPEG_MAGIC = b"\xff\xd8\xff"


def _read_bytes(source: str | Path | bytes, label: str) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: image file not found") from None
    except OSError as err:
        raise ImageLoadError(f"{label}: cannot read image ({type(err).__name__}: {err})") from None


class DeviceDecodePlan:
    """Host half: JPEG header -> (bytes, crop box, flip); other images -> the host transform.

    Called under the sample's seeded RNG (see ``make_sample``); draws the crop with
    torchvision's RandomResizedCrop rule and the flip with probability 1/2. ``scale=None``
    plans the evaluation view instead: the whole image (resized to a square), never flipped;
    ``scale=(1, 1)`` takes the whole image too (`takes_whole_image`), as `build_image_transform` does.
    """

    def __init__(self, scale: tuple[float, float] | None, hflip: bool,
                 host_transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.scale = scale
        self.hflip = hflip
        self.host_transform = host_transform  # uint8 output, for images that stay on the host

    def __call__(self, source: str | Path | bytes, name: str) -> dict[str, Any]:
        data = _read_bytes(source, name)
        if not data.startswith(JPEG_MAGIC):
            return {"image": self.host_transform(load_image(data, name=name))}
        try:
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                if header.mode not in ("L", "RGB"):  # CMYK/YCCK: leave them to PIL
                    return {"image": self.host_transform(load_image(data, name=name))}
                if self.scale is None or takes_whole_image(self.scale):
                    top, left, height, width = 0, 0, header.height, header.width
                else:
                    top, left, height, width = RandomResizedCrop.get_params(header, list(self.scale), [3 / 4, 4 / 3])
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ImageLoadError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None
        flip = self.hflip and bool(torch.rand(1) < 0.5)
        return {"jpeg": data, "name": name, "crop": (top, left, height, width), "flip": flip}


def collate_planned(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The image part of a batch of planned samples (the Collator adds captions and ids).

    ``image`` holds only the host-decoded images, ``jpeg`` the rest; ``image_slots`` says
    which batch position each ``image`` row fills. Bytes, boxes and slots are plain Python
    values, so Lightning's device transfer leaves them on the host.
    """
    host = [i for i, s in enumerate(samples) if "image" in s]
    jpeg = [i for i, s in enumerate(samples) if "jpeg" in s]
    images = (torch.stack([samples[i]["image"] for i in host]) if host
              else torch.zeros(0, 3, 0, 0, dtype=torch.uint8))
    return {"image": images, "image_slots": host,
            "jpeg": {"data": [samples[i]["jpeg"] for i in jpeg], "name": [samples[i]["name"] for i in jpeg],
                     "crop": [samples[i]["crop"] for i in jpeg], "flip": [samples[i]["flip"] for i in jpeg],
                     "slots": jpeg}}


class DeviceDecoder:
    """Device half: decode the batch's JPEGs, crop/resize/flip them, put every image in its slot."""

    def __init__(self, image_size: int, interpolation: str) -> None:
        self.size = [image_size, image_size]
        self.mode = INTERPOLATIONS[interpolation]
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        if "jpeg" not in batch:
            return batch
        jpeg = batch.pop("jpeg")
        slots: list[torch.Tensor | None] = [None] * batch["size"]
        for slot, image in zip(batch.pop("image_slots"), batch["image"], strict=True):
            slots[slot] = image
        side = self._side_stream(device)
        with torch.cuda.stream(side) if side is not None else nullcontext():
            made, dropped = self._decode_and_crop(jpeg, device)
        if side is not None:
            main = torch.cuda.current_stream(device)
            main.wait_stream(side)
            for image in made.values():
                image.record_stream(main)
        for slot, image in made.items():
            slots[slot] = image
        if dropped:
            batch = drop_samples(batch, dropped)
        kept = [s for s in slots if s is not None]
        batch["image"] = torch.stack(kept) if kept else torch.zeros(0, 3, 0, 0, dtype=torch.uint8, device=device)
        return batch

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        """CUDA: this device's decode stream, its previous batch finished; elsewhere ``None``."""
        if device.type != "cuda":
            return None
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device)
        stream = self._side_streams[device]
        stream.synchronize()  # its freed blocks (last batch's full-size decodes) are no longer read
        return stream

    def _decode_and_crop(self, jpeg: dict[str, list], device: torch.device
                         ) -> tuple[dict[int, torch.Tensor], list[tuple[int, str, str]]]:
        """Decode the batch's JPEGs and crop/resize/flip them: images by slot, and the dropped ones."""
        made: dict[int, torch.Tensor] = {}
        dropped: list[tuple[int, str, str]] = []
        decoded = self._decode(jpeg["data"], device)
        for slot, data, name, image, (top, left, h, w), flip in zip(
                jpeg["slots"], jpeg["data"], jpeg["name"], decoded, jpeg["crop"], jpeg["flip"], strict=True):
            if image is None:
                image = self._host_fallback(data, name, device)
            if isinstance(image, str):
                dropped.append((slot, name, image))
                continue
            out = TF.resized_crop(image, top, left, h, w, self.size, interpolation=self.mode, antialias=True)
            made[slot] = out.flip(-1) if flip else out
        return made, dropped

    @staticmethod
    def _decode(data: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
        """One batched call; if the decoder rejects the batch, one call per image to find the culprits."""
        raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
        if not raw:
            return []
        try:
            return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            # A failed call may leave writes queued on nvJPEG's private stream into blocks it
            # has just freed: drain the device before anything can be handed those blocks.
            _drain(device)
            out: list[torch.Tensor | None] = []
            for r in raw:
                try:
                    out.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            if None in out:
                _drain(device)
            return out

    @staticmethod
    def _host_fallback(data: bytes, name: str, device: torch.device) -> torch.Tensor | str:
        """PIL decode of a JPEG the device decoder rejected; the reason text if PIL cannot either."""
        try:
            return TF.pil_to_tensor(load_image(data, name=name)).to(device)
        except ImageLoadError as err:
            return str(err)


def _drain(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def drop_samples(batch: dict[str, Any], dropped: list[tuple[int, str, str]]) -> dict[str, Any]:
    """Remove samples found bad after collation ((position, name, reason) each) and count them as skipped.

    Every tensor or list with one entry per sample is cut; ``image`` is rebuilt by the caller.
    """
    size = batch["size"]
    gone = {slot for slot, _, _ in dropped}
    keep = [i for i in range(size) if i not in gone]
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == size and key != "image":
            out[key] = value[torch.tensor(keep, device=value.device, dtype=torch.long)]
        elif isinstance(value, list) and len(value) == size and key not in ("skipped",):
            out[key] = [value[i] for i in keep]
    out["size"] = len(keep)
    out["n_skipped"] = batch.get("n_skipped", 0) + len(dropped)
    out["skipped"] = [*batch.get("skipped", []), *((name, reason) for _, name, reason in dropped)]
    return out
