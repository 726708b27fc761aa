"""Fashion-MNIST (Debian ``dataset-fashion-mnist``) exported as class folders for zero-shot tests.

Debian ships the original gzipped IDX files under ``/usr/share/datasets/fashion-mnist``:
``{train,t10k}-images-idx3-ubyte.gz`` (uint8, N x 28 x 28) and the matching
``-labels-idx1-ubyte.gz``; ``t10k`` is the 10,000-image test split, ``train`` 60,000.
Images are light garments on a black background, stored as-is (no inversion).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import write_json_atomic
from .common import AssetMissing, staged_dir

DEFAULT_FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist"
MARKER = "fashion_mnist.json"
MANIFEST = "manifest.jsonl"
# Label order of the dataset (its README); names are what zero-shot prompts are built from.
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_FOLDERS = ("tshirt_top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle_boot")
_FILE_SPLIT = {"train": "train", "test": "t10k"}
_WHAT = "Fashion-MNIST"


class IdxError(ValueError):
    """A file that is not a valid uint8 IDX array."""


def fashion_mnist_root() -> Path:
    """The Debian package's folder, or :class:`AssetMissing` with the apt command."""
    files = [DEFAULT_FASHION_ROOT / f"{stem}-{kind}.gz" for stem in _FILE_SPLIT.values()
             for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise AssetMissing(_WHAT, f"missing {', '.join(missing)}", FASHION_INSTALL)
    return DEFAULT_FASHION_ROOT


def read_idx(path: Path) -> np.ndarray:
    """A uint8 IDX array (gzipped when the name ends in .gz), validated against its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise IdxError(f"{path}: cannot read ({err})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise IdxError(f"{path}: not a uint8 IDX file (magic {data[:4].hex() or 'empty'}, expected 000008NN)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{path}: header truncated ({len(data)} bytes for {ndim} dims)")
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    if len(data) - header != int(np.prod(shape)):
        raise IdxError(f"{path}: {len(data) - header} data bytes, header shape {shape} needs {int(np.prod(shape))}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root: Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28, labels N) of ``split`` ("train" or "test") as uint8 arrays."""
    if split not in _FILE_SPLIT:
        raise ValueError(f"split must be one of {sorted(_FILE_SPLIT)}, got {split!r}")
    root = Path(root) if root is not None else fashion_mnist_root()
    stem = _FILE_SPLIT[split]
    images_path = root / f"{stem}-images-idx3-ubyte.gz"
    labels_path = root / f"{stem}-labels-idx1-ubyte.gz"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise AssetMissing(_WHAT, f"{path} does not exist", FASHION_INSTALL)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise IdxError(f"{images_path} / {labels_path}: shapes {images.shape} and {labels.shape} do not pair up")
    if labels.size and labels.max() >= len(FASHION_CLASSES):
        raise IdxError(f"{labels_path}: label {int(labels.max())} is not one of the {len(FASHION_CLASSES)} classes")
    return images, labels


def select_subset(labels: np.ndarray, count: int) -> list[int]:
    """Indices of a class-balanced subset: the first count/10 of each class in file order.

    File order needs no seed and never changes, so the subset is the same everywhere;
    when ``count`` is not a multiple of 10 the lowest labels get one image more.
    """
    classes = len(FASHION_CLASSES)
    if not 0 < count <= len(labels):
        raise ValueError(f"count must be in 1..{len(labels)}, got {count}")
    chosen: list[int] = []
    for label in range(classes):
        want = count // classes + (1 if label < count % classes else 0)
        available = np.flatnonzero(labels == label)
        if len(available) < want:
            raise ValueError(f"class {label} ({FASHION_CLASSES[label]}) has {len(available)} images, {want} wanted")
        chosen.extend(int(i) for i in available[:want])
    return sorted(chosen)


def export_fashion_mnist(root: Path | None, out_dir: Path, count: int = 1000, split: str = "test") -> Path:
    """Write ``count`` images of ``split`` as ``out_dir/<class folder>/<split>-<index>.png``.

    Also writes ``manifest.jsonl`` (one ``{"image", "caption", "label", "class_name",
    "index"}`` row per image; caption = class name, readable as a unialign manifest) and
    ``fashion_mnist.json`` with the class names in label order. ``index`` is the position
    in the source file. The folder is replaced as a whole.
    """
    root = Path(root) if root is not None else fashion_mnist_root()
    images, labels = load_fashion_mnist(root, split)
    indices = select_subset(labels, count)
    out_dir = Path(out_dir)
    with staged_dir(out_dir, MARKER) as stage:
        for folder in FASHION_FOLDERS:
            (stage / folder).mkdir()
        rows = []
        for index in indices:
            label = int(labels[index])
            rel = f"{FASHION_FOLDERS[label]}/{split}-{index:05d}.png"
            Image.fromarray(images[index]).save(stage / rel)
            rows.append({"image": rel, "caption": FASHION_CLASSES[label], "label": label,
                         "class_name": FASHION_CLASSES[label], "index": index})
        (stage / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        write_json_atomic(stage / MARKER, {
            "dataset": "fashion-mnist", "split": split, "count": len(indices),
            "source": str(root),
            "selection": "first count/10 images of each class in file order",
            "classes": [{"label": i, "name": n, "folder": f}
                        for i, (n, f) in enumerate(zip(FASHION_CLASSES, FASHION_FOLDERS, strict=True))],
        })
    return out_dir
