"""Builders shared by the evaluation tests: fake datasets, a crafted colour model, tiny baselines.

Holds no tests itself; test_eval_*.py import from it (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unialign.evaluation.models import EvalModel

RGB = tuple[float, float, float]
COLOURS: dict[str, RGB] = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def solid(rgb: RGB, size: int = 32) -> np.ndarray:
    return np.tile(np.array([round(255 * c) for c in rgb], dtype=np.uint8), (size, size, 1))


def write_cifar(root: Path, variant: str, classes: Sequence[str], train: Sequence[tuple[RGB, int]],
                test: Sequence[tuple[RGB, int]]) -> Path:
    """A `cifar-10-batches-py` or `cifar-100-python` folder with solid-colour images, in the authors' format."""
    root.mkdir(parents=True, exist_ok=True)

    def batch(items: Sequence[tuple[RGB, int]], labels_key: str) -> dict:
        data = np.stack([solid(rgb).transpose(2, 0, 1).reshape(-1) for rgb, _ in items]) if items else \
            np.zeros((0, 3072), np.uint8)
        return {b"data": data, labels_key.encode(): [label for _, label in items], b"filenames": []}

    def dump(obj: dict, name: str) -> None:
        with open(root / name, "wb") as f:
            pickle.dump(obj, f)

    if variant == "cifar10":
        dump({b"label_names": [c.encode() for c in classes]}, "batches.meta")
        for i in range(5):  # the 5 training batches: split the training items between them
            dump(batch(train[i::5], "labels"), f"data_batch_{i + 1}")
        dump(batch(test, "labels"), "test_batch")
    else:
        dump({b"fine_label_names": [c.encode() for c in classes], b"coarse_label_names": [b"all"]}, "meta")
        dump(batch(train, "fine_labels"), "train")
        dump(batch(test, "fine_labels"), "test")
    return root


def write_folder(root: Path, images: dict[str, Sequence[RGB]], suffix: str = ".png") -> Path:
    """ROOT/CLASS/i.png with solid colours."""
    for name, colours in images.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, rgb in enumerate(colours):
            Image.fromarray(solid(rgb)).save(root / name / f"{i}{suffix}")
    return root


class ColourModel(EvalModel):
    """Embeds an image as its mean RGB and a text as the sum of the colour words in it (both normalised).

    Zero-shot answers and retrieval ranks of such a model can be worked out by hand.
    """

    def __init__(self, name: str = "colour") -> None:
        self.name = name
        self.width = 3
        self.device = torch.device("cpu")

    @staticmethod
    def preprocess(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(pixels.mean(dim=(2, 3)), dim=-1)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        words = [[w for w in re.findall(r"[a-z]+", t) if w in COLOURS] for t in texts]
        vectors = [torch.tensor([sum(COLOURS[w][c] for w in ws) for c in range(3)]) for ws in words]
        return {"rgb": torch.stack(vectors).float() + 1e-6}

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(tokens["rgb"], dim=-1)


TINY_OPENCLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_openclip(directory: Path, arch: str = "TinyCLIP-unialign-test") -> tuple[str, Path]:
    """Register a tiny open_clip architecture and save random weights for it: (arch, weights file)."""
    import open_clip

    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{arch}.json").write_text(json.dumps(TINY_OPENCLIP))
    open_clip.add_model_config(directory / f"{arch}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    torch.save(model.state_dict(), directory / "weights.pt")
    return arch, directory / "weights.pt"


def tiny_hf_clip(directory: Path, text_model_dir: Path) -> Path:
    """A randomly initialised transformers CLIPModel with image processor and tokenizer, saved locally."""
    from transformers import BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = BertTokenizerFast.from_pretrained(text_model_dir)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def write_manifest(root: Path, items: Sequence[tuple[RGB, Sequence[str]]]) -> Path:
    """images/i.png + manifest.jsonl, one row per caption, grouped by image_id."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (rgb, captions) in enumerate(items):
        Image.fromarray(solid(rgb)).save(root / "images" / f"{i}.png")
        rows += [{"image": f"images/{i}.png", "caption": c, "image_id": i} for c in captions]
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
