"""CLIP-style zero-shot classification: class names in prompt templates, no training.

Each class is represented by the mean of its L2-normalised prompt embeddings (renormalised),
as in CLIP and CLIP_benchmark, so results are comparable with published zero-shot numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .classification import (classification_metrics, default_dataset_name, image_features, read_classification,
                             read_templates)
from .models import EvalError, EvalModel
from .run import result_header


@torch.no_grad()
def zeroshot_classifier(model: EvalModel, classnames: Sequence[str], templates: Sequence[str],
                        batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """(C, D) class embeddings: mean over templates of normalised prompt embeddings, renormalised."""
    if not classnames or not templates:
        raise EvalError(f"need class names and templates, got {len(classnames)} and {len(templates)}")
    prompts = [t.replace("{c}", name) for name in classnames for t in templates]
    emb = model.encode_texts(prompts, batch_size=batch_size, progress=progress)
    return F.normalize(emb.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


def evaluate_zeroshot(model: EvalModel, dataset: str | Path, fmt: str = "folder", split: str = "test",
                      class_map: str | Path | None = None, templates: str | Path | None = None,
                      dataset_name: str | None = None, batch_size: int = 64, num_workers: int = 0,
                      progress: bool = True) -> dict[str, Any]:
    """top-1 / top-5 / mean per-class recall (percent) of zero-shot classification on one dataset."""
    data = read_classification(dataset, fmt, split, class_map)
    prompts = read_templates(templates, fmt)
    classifier = zeroshot_classifier(model, data.classes, prompts, progress=progress)
    image_emb, labels, skipped = image_features(model, data, batch_size, num_workers, progress)
    metrics = classification_metrics(100.0 * image_emb @ classifier.T, labels)
    return {
        **result_header("zeroshot", model.name, dataset_name or default_dataset_name(dataset, fmt)),
        **metrics,
        "split": split if fmt in ("cifar10", "cifar100") else None,
        "n_images": int(labels.numel()),
        "n_classes": len(data.classes),
        "n_templates": len(prompts),
        "images_skipped": len(skipped),
        "skipped": [{"image": p, "reason": r} for p, r in skipped],
        "source": data.source,
    }
