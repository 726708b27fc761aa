"""Image classification data (class folders, ImageNet val, CIFAR pickles), prompts and metrics.

Zero-shot, linear-probe and fine-tuning evaluations all read their data here, so every
one of them sees the same images, labels and class names for a dataset.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.images import IMAGE_SUFFIXES, load_image
from .models import EvalModel
from .specs import FORMATS, EvalError

_TEMPLATES = resources.files("unialign.evaluation") / "templates"


@dataclass(frozen=True)
class ClassificationSet:
    """Labelled images: files (`paths`) or decoded pixels (`arrays`, N x H x W x 3 uint8, CIFAR)."""

    classes: list[str]  # class names, index = label; prompts are built from them
    labels: list[int]
    paths: list[str] | None
    arrays: np.ndarray | None
    source: str  # where it was read from (results and messages)

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        """How messages and skip lists name image `i`: its file, or its index in the source."""
        return self.paths[i] if self.paths is not None else f"{self.source}[{i}]"

    def image(self, i: int) -> Image.Image:
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i])
        assert self.paths is not None
        return load_image(self.paths[i])


# ---------------------------------------------------------------------------------------
# Readers


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise EvalError(f"dataset {root} is not a directory")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise EvalError(f"dataset {root}: no class folders (expected ROOT/CLASS/IMAGE files)")
    return dirs


def read_image_folder(root: str | Path) -> ClassificationSet:
    """ImageFolder layout: ROOT/CLASS_NAME/*.jpg; labels in sorted folder order, '_' read as a space."""
    root = Path(root)
    classes, labels, paths = [], [], []
    for label, folder in enumerate(_class_dirs(root)):
        classes.append(folder.name.replace("_", " "))
        files = _image_files(folder)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    if not paths:
        raise EvalError(f"dataset {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    return ClassificationSet(classes, labels, paths, None, str(root))


def read_class_map(path: str | Path | None) -> list[tuple[str, str]]:
    """(folder id, class name) in class-index order, from a mapping file; None: the shipped ImageNet-1K map.

    Accepted: JSON ``{"0": ["n01440764", "tench"], ...}`` (Keras' imagenet_class_index.json),
    JSON ``{"n01440764": "tench", ...}`` (index = sorted ids), or text lines ``ID NAME``
    (``LOC_synset_mapping.txt``, index = line order; the name is cut at its first comma).
    """
    if path is None:
        text, where = (_TEMPLATES / "imagenet_classnames.tsv").read_text(encoding="utf-8"), "imagenet_classnames.tsv"
    else:
        path = Path(path)
        if not path.is_file():
            raise EvalError(f"class map {path} does not exist")
        text, where = path.read_text(encoding="utf-8"), str(path)
        if path.suffix.lower() == ".json":
            return _class_map_json(text, where)
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise EvalError(f"{where}:{lineno}: expected 'ID NAME', got {line!r}")
        pairs.append((parts[0], parts[1].split(",")[0].strip()))
    if not pairs:
        raise EvalError(f"{where}: no 'ID NAME' lines")
    return pairs


def _class_map_json(text: str, where: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise EvalError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise EvalError(f"{where}: expected a non-empty JSON object")
    if all(isinstance(v, list) for v in data.values()):  # {"index": [id, name]}
        try:
            order = sorted(data, key=int)
        except ValueError:
            raise EvalError(f"{where}: keys must be class indices when values are [id, name] lists") from None
        if [int(k) for k in order] != list(range(len(order))):
            raise EvalError(f"{where}: class indices must be 0..{len(order) - 1} without gaps")
        bad = [k for k in order if len(data[k]) != 2 or not all(isinstance(x, str) for x in data[k])]
        if bad:
            raise EvalError(f"{where}: entry {bad[0]!r} must be [id, name], got {data[bad[0]]!r}")
        return [(data[k][0], data[k][1]) for k in order]
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise EvalError(f"{where}: entry {bad[0]!r} must map an id to a class name, got {data[bad[0]]!r}")
    return [(k, data[k]) for k in sorted(data)]


def read_imagenet(root: str | Path, class_map: str | Path | None = None) -> ClassificationSet:
    """ImageNet val layout: ROOT/WNID/*.JPEG; labels and names from the class map (all its classes are
    candidates, so a subset of the folders is still scored against every class)."""
    root = Path(root)
    pairs = read_class_map(class_map)
    index = {folder_id: i for i, (folder_id, _) in enumerate(pairs)}
    labels, paths = [], []
    for folder in _class_dirs(root):
        if folder.name not in index:
            raise EvalError(f"dataset {root}: folder {folder.name!r} is not in the class map "
                            f"({class_map or 'shipped ImageNet-1K map'})")
        files = _image_files(folder)
        paths += [str(p) for p in files]
        labels += [index[folder.name]] * len(files)
    if not paths:
        raise EvalError(f"dataset {root}: no image files in its class folders")
    return ClassificationSet([name for _, name in pairs], labels, paths, None, str(root))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches hold only dicts, bytes, lists and numpy arrays; refusing any other global means a
    tampered file cannot run code when it is read."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR batch)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EvalError(f"CIFAR file {path} does not exist")
    try:
        with open(path, "rb") as f:
            raw = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise EvalError(f"{path}: not a CIFAR python pickle ({err})") from None
    if not isinstance(raw, dict):
        raise EvalError(f"{path}: expected a pickled dict, got {type(raw).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_field(batch: dict[str, Any], name: str, path: Path) -> Any:
    if name not in batch:
        raise EvalError(f"{path}: field '{name}' is missing (fields: {sorted(batch)})")
    return batch[name]


def read_cifar(root: str | Path, variant: Literal["cifar10", "cifar100"], split: str = "test") -> ClassificationSet:
    """`cifar-10-batches-py` / `cifar-100-python` folders as distributed by the CIFAR authors."""
    root = Path(root)
    if split not in ("train", "test"):
        raise EvalError(f"CIFAR split must be 'train' or 'test', got {split!r}")
    if variant == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_file, names_key, labels_key = "batches.meta", "label_names", "labels"
    else:
        files = [split]
        meta_file, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
    meta_path = root / meta_file
    names = _cifar_field(_unpickle(meta_path), names_key, meta_path)
    classes = [(n.decode() if isinstance(n, bytes) else str(n)).replace("_", " ") for n in names]
    arrays, labels = [], []
    for name in files:
        path = root / name
        batch = _unpickle(path)
        data = np.asarray(_cifar_field(batch, "data", path), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise EvalError(f"{path}: field 'data' must be N x 3072 uint8, got shape {data.shape}")
        batch_labels = [int(x) for x in _cifar_field(batch, labels_key, path)]
        if len(batch_labels) != len(data):
            raise EvalError(f"{path}: {len(data)} images but {len(batch_labels)} labels")
        bad = [x for x in batch_labels if not 0 <= x < len(classes)]
        if bad:
            raise EvalError(f"{path}: label {bad[0]} outside 0..{len(classes) - 1}")
        arrays.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planes R, G, B -> HWC
        labels += batch_labels
    return ClassificationSet(classes, labels, None, np.ascontiguousarray(np.concatenate(arrays)), str(root))


def read_classification(path: str | Path, fmt: str, split: str = "test",
                        class_map: str | Path | None = None) -> ClassificationSet:
    """Dispatch on `fmt`; `split` matters for CIFAR only (folder layouts are one split per folder)."""
    if fmt == "folder":
        return read_image_folder(path)
    if fmt == "imagenet":
        return read_imagenet(path, class_map)
    if fmt in ("cifar10", "cifar100"):
        return read_cifar(path, fmt, split)  # type: ignore[arg-type]
    raise EvalError(f"dataset format must be one of {FORMATS}, got {fmt!r}")


def default_dataset_name(path: str | Path, fmt: str) -> str:
    """How results name a dataset, so reports can line them up with the paper's numbers."""
    return {"imagenet": "imagenet1k", "cifar10": "cifar10", "cifar100": "cifar100"}.get(fmt, Path(path).name)


# ---------------------------------------------------------------------------------------
# Prompts


def read_templates(path: str | Path | None = None, fmt: str = "folder") -> list[str]:
    """Prompt templates with a ``{c}`` slot; default: CLIP's 18 CIFAR ones for CIFAR, its 80 ImageNet ones otherwise."""
    if path is None:
        name = "cifar_templates.txt" if fmt in ("cifar10", "cifar100") else "imagenet_templates.txt"
        text, where = (_TEMPLATES / name).read_text(encoding="utf-8"), name
    else:
        if not Path(path).is_file():
            raise EvalError(f"templates file {path} does not exist")
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    templates = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if "{c}" not in line:
            raise EvalError(f"{where}:{lineno}: template has no '{{c}}' slot for the class name: {line!r}")
        templates.append(line.strip())
    if not templates:
        raise EvalError(f"{where}: no templates")
    return templates


# ---------------------------------------------------------------------------------------
# Features and metrics


class LabelledImages(Dataset):
    """(index, pixels or None, reason) per image; unreadable files are reported, not fatal."""

    def __init__(self, data: ClassificationSet, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.transform(self.data.image(i)), ""
        except Exception as err:  # an unreadable file is reported, never fatal
            return i, None, f"{type(err).__name__}: {err}"


def collate_labelled(items: list[tuple[int, torch.Tensor | None, str]]
                     ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    return [i for i, _ in good], (torch.stack([x for _, x in good]) if good else None), bad


def image_features(model: EvalModel, data: ClassificationSet, batch_size: int = 64, num_workers: int = 0,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """L2-normalised image embeddings, their labels, and the (image, reason) of unreadable ones (dropped).

    Files go through `EvalModel.encode_images` (the shared encoder with progress and skip
    rules); in-memory CIFAR pixels through the same preprocess and `encode_image`.
    """
    if data.paths is not None:
        emb, kept, skipped = model.encode_images(data.paths, batch_size, num_workers, progress)
        return emb, torch.tensor([data.labels[i] for i in kept], dtype=torch.long), skipped
    loader = DataLoader(LabelledImages(data, model.preprocess), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_labelled)
    out, kept, skipped = [], [], []
    for indices, pixels, bad in tqdm(loader, desc="images", unit="batch", disable=not progress):
        skipped += [(data.describe(i), reason) for i, reason in bad]
        if pixels is not None:
            out.append(model.encode_image(pixels.to(model.device)).float().cpu())
            kept += indices
    if not out:
        raise EvalError(f"dataset {data.source}: no image could be encoded ({skipped[0][1] if skipped else 'empty'})")
    return torch.cat(out), torch.tensor([data.labels[i] for i in kept], dtype=torch.long), skipped


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
                           ) -> dict[str, float]:
    """top-K accuracy (percent) for each K below the number of classes + 1, and mean per-class recall.

    Ties count against the model (the true class ranks below every class scoring >= it), as in
    retrieval, so a collapsed classifier scores 0 and not 100. Mean per-class recall averages
    over the classes that occur in `labels` (sklearn's balanced accuracy).
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need logits (N, C) and labels (N,) with N > 0, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    true_score = logits.gather(1, labels[:, None])
    others = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    rank = ((logits >= true_score) & others).sum(dim=1)  # classes that beat or tie the true one
    metrics = {f"top{k}": 100.0 * float((rank < k).float().mean()) for k in ks if k <= logits.shape[1]}
    hits = (rank == 0).float()
    present = labels.unique()
    metrics["mean_per_class_recall"] = 100.0 * float(
        torch.stack([hits[labels == c].mean() for c in present]).mean())
    return metrics
