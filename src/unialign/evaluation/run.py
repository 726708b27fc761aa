"""`unialign eval retrieval`: the Karpathy test protocol on a trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..data.records import read_karpathy_eval
from ..model.factory import load
from .encode import encode_images, encode_texts
from .retrieval import retrieval_metrics


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_retrieval(checkpoint: str | Path, karpathy: str | Path, images: str | Path, split: str = "test",
                       batch_size: int = 64, num_workers: int = 0, device: str | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Recall@K both ways; unreadable images are dropped with their captions and counted."""
    device = device or default_device()
    model, preprocess, tokenizer = load(checkpoint, device=device)
    data = read_karpathy_eval(karpathy, images, split)
    image_emb, kept, skipped = encode_images(model, preprocess, data.images, batch_size, num_workers, device,
                                             progress)
    if not kept:
        raise ValueError(f"no readable image in split {split!r} of {karpathy}")
    new_index = {old: new for new, old in enumerate(kept)}
    captions = [(c, new_index[i]) for c, i in zip(data.captions, data.caption_to_image) if i in new_index]
    text_emb = encode_texts(model, tokenizer, [c for c, _ in captions], device=device, progress=progress)
    caption_to_image = torch.tensor([i for _, i in captions], dtype=torch.long)
    metrics = retrieval_metrics(image_emb, text_emb, caption_to_image)
    return {
        **metrics,
        "split": split,
        "n_images": len(kept),
        "n_captions": len(captions),
        "images_skipped": len(skipped),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "checkpoint": str(checkpoint),
    }


def write_json(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
