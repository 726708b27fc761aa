"""Fine-tuning a unialign checkpoint's encoders on labelled tasks (image classification, GLUE).

The paper fixes the heads, not the recipes: images use the mean of the patch tokens of the
shared block's output -> LayerNorm -> Linear; text uses the CLS token -> pooler
(Linear + tanh) -> Linear (see `glue.py`). Both encoders run through the shared block, as
in retrieval, because that block is part of what the method trains. The default recipes
(`specs.FinetuneConfig`, `specs.GLUE_DEFAULTS`) are common ViT / BERT fine-tuning choices,
documented in docs/EVALUATION.md, not the author's recipes, which the paper does not give.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from ..model.factory import load_model
from ..model.smke import IMAGE, SMKE, no_weight_decay_names, param_groups
from .classification import (ClassificationSet, LabelledImages, classification_metrics, collate_labelled,
                             default_dataset_name, read_classification)
from .run import default_device, result_header
from .specs import EvalError, FinetuneConfig

log = logging.getLogger(__name__)


def _prefix_tokens(tower: nn.Module) -> int:
    """CLS (and register) tokens ahead of the patches: timm says how many; HF ViTs have one CLS."""
    return int(getattr(getattr(tower, "model", None), "num_prefix_tokens", 1))


class ImageClassifier(nn.Module):
    """Image tower -> shared block -> mean of patch tokens -> LayerNorm -> Linear."""

    def __init__(self, model: SMKE, num_classes: int) -> None:
        super().__init__()
        self.smke = model
        self.n_prefix = _prefix_tokens(model.image_tower)
        self.norm = nn.LayerNorm(model.width)
        self.head = nn.Linear(model.width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.smke.forward_tokens(self.smke.image_tower(pixels), IMAGE)
        return self.head(self.norm(tokens[:, self.n_prefix:].mean(dim=1)))

    def trainable(self) -> Iterable[tuple[str, nn.Parameter]]:
        """The image path only: the text tower and the KD head get no gradient here."""
        skip = ("smke.text_tower.", "smke.text_proj.", "smke.kd_head.", "smke.logit_scale")
        return ((n, p) for n, p in self.named_parameters() if not n.startswith(skip))


def fit(module: nn.Module, named_params: Iterable[tuple[str, nn.Parameter]], loader: DataLoader,
        loss_of: Callable[[Any], torch.Tensor | None], evaluate: Callable[[], dict[str, Any]], cfg: FinetuneConfig,
        device: torch.device, progress: bool = True) -> list[dict[str, Any]]:
    """AdamW + warm-up/decay schedule; `evaluate` runs after every epoch. Returns the per-epoch history.

    `loss_of(batch)` returns None for a batch with nothing usable (all its images unreadable).
    """
    # The training rule: no weight decay on biases, norms, scales, embeddings and tokens.
    groups = param_groups(named_params, cfg.weight_decay, no_weight_decay_names(module))
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    total = cfg.epochs * len(loader)
    make_schedule = get_cosine_schedule_with_warmup if cfg.schedule == "cosine" else get_linear_schedule_with_warmup
    sched = make_schedule(opt, int(cfg.warmup_fraction * total), total)
    params = [p for g in opt.param_groups for p in g["params"]]
    history = []
    for epoch in range(cfg.epochs):
        module.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress)
        for batch in bar:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = loss_of(batch)
            if loss is None:
                continue
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if not losses:
            raise EvalError(f"epoch {epoch + 1}: no trainable batch (every image unreadable?)")
        module.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            metrics = evaluate()
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), **metrics})
        log.info("epoch %d: %s", epoch + 1, history[-1])
    return history


def _image_loader(data: ClassificationSet, transform: Callable, batch_size: int, shuffle: bool, num_workers: int,
                  seed: int) -> DataLoader:
    return DataLoader(LabelledImages(data, transform), batch_size=batch_size, shuffle=shuffle,
                      num_workers=num_workers, collate_fn=collate_labelled,
                      generator=torch.Generator().manual_seed(seed))


def finetune_image(checkpoint: str | Path, train_dataset: str | Path, test_dataset: str | Path,
                   fmt: str = "folder", class_map: str | Path | None = None, cfg: FinetuneConfig | None = None,
                   train_scale: tuple[float, float] = (0.08, 1.0), dataset_name: str | None = None,
                   num_workers: int = 0, device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune the image encoder + a classification head; test top-1/top-5 after every epoch.

    The result's metrics are those of the LAST epoch: picking the best epoch on the test
    set would overstate them.
    """
    cfg = cfg or FinetuneConfig()
    torch.manual_seed(cfg.seed)
    dev = torch.device(device or default_device())
    train = read_classification(train_dataset, fmt, "train", class_map)
    test = read_classification(test_dataset, fmt, "test", class_map)
    if train.classes != test.classes:
        raise EvalError(f"train {train.source} and test {test.source} have different classes")
    smke, card = load_model(checkpoint, device=dev)  # one read: weights and preprocessing
    eval_transform = card.preprocess.transform()
    train_transform = card.preprocess.transform(train=True, scale=train_scale)
    module = ImageClassifier(smke, len(train.classes)).to(dev)
    train_loader = _image_loader(train, train_transform, cfg.batch_size, True, num_workers, cfg.seed)
    test_loader = _image_loader(test, eval_transform, cfg.batch_size, False, num_workers, cfg.seed)
    skipped: dict[str, str] = {}

    def loss_of(batch: tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]) -> torch.Tensor | None:
        indices, pixels, bad = batch
        skipped.update({train.describe(i): reason for i, reason in bad})
        if pixels is None:
            return None
        labels = torch.tensor([train.labels[i] for i in indices], device=dev)
        return F.cross_entropy(module(pixels.to(dev)), labels, label_smoothing=cfg.label_smoothing)

    def evaluate() -> dict[str, Any]:
        logits, labels = [], []
        for indices, pixels, bad in tqdm(test_loader, desc="test", unit="batch", disable=not progress):
            skipped.update({test.describe(i): reason for i, reason in bad})
            if pixels is not None:
                logits.append(module(pixels.to(dev)).float().cpu())
                labels += [test.labels[i] for i in indices]
        if not logits:
            raise EvalError(f"dataset {test.source}: no readable test image")
        return classification_metrics(torch.cat(logits), torch.tensor(labels))

    history = fit(module, module.trainable(), train_loader, loss_of, evaluate, cfg, dev, progress)
    final = {k: v for k, v in history[-1].items() if k not in ("epoch", "train_loss")}
    return {
        **result_header("finetune_image", str(checkpoint), dataset_name or default_dataset_name(test_dataset, fmt)),
        **final,
        "history": history,
        "config": {**asdict(cfg), "train_scale": list(train_scale)},
        "n_train": len(train),
        "n_test": len(test),
        "n_classes": len(train.classes),
        "images_skipped": len(skipped),
        "skipped": [{"image": k, "reason": v} for k, v in sorted(skipped.items())],
    }
