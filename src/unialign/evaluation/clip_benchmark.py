"""CLIP_benchmark hook: evaluate a unialign checkpoint with CLIP_benchmark's own datasets and metrics.

CLIP_benchmark looks model loaders up in ``clip_benchmark.models.TYPE2FUNC`` (model type ->
``load(model_name, pretrained, cache_dir, device) -> (model, transform, tokenizer)``) and
then calls ``model.encode_image(pixels)``, ``tokenizer(texts).to(device)`` and
``model.encode_text(token_tensor)``. A unialign model already takes bare input-id tensors
in ``encode_text`` (padding is inferred from the pad id), so the hook only wraps the
tokenizer to return the id tensor instead of a dict.

Run CLIP_benchmark's command line with the hook registered::

    python -m unialign.evaluation.clip_benchmark eval --model_type unialign \\
        --pretrained runs/paper/checkpoints/final.ckpt --model s-smke \\
        --dataset mscoco_captions --dataset_root /data/coco --task zeroshot_retrieval --recall_k 1 5 10
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

from ..model.factory import TextTokenizer, load
from ..model.smke import SMKE

MODEL_TYPE = "unialign"


class IdsTokenizer:
    """``tokenizer(texts) -> LongTensor`` of input ids, the shape CLIP_benchmark moves with ``.to(device)``."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        return self.tokenizer(texts)["input_ids"]


def load_unialign(model_name: str, pretrained: str, cache_dir: str | None = None,
                  device: str | torch.device = "cpu") -> tuple[SMKE, Callable, IdsTokenizer]:
    """CLIP_benchmark loader: `pretrained` is the checkpoint path; `model_name` only labels results."""
    if not Path(pretrained).is_file():
        raise FileNotFoundError(f"--pretrained {pretrained} is not a unialign checkpoint file "
                                f"(model {model_name!r})")
    model, preprocess, tokenizer = load(pretrained, device=device)
    return model, preprocess, IdsTokenizer(tokenizer)


def register() -> None:
    """Add the `unialign` model type to CLIP_benchmark (idempotent)."""
    from clip_benchmark import models

    models.TYPE2FUNC[MODEL_TYPE] = load_unialign
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the CLI's --model_type choices are this same list


def main() -> None:
    """CLIP_benchmark's command line with `--model_type unialign` available."""
    register()
    from clip_benchmark.cli import main as clip_benchmark_main

    sys.exit(clip_benchmark_main())


if __name__ == "__main__":
    main()
