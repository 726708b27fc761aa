"""GLUE: fine-tune the text encoder of a unialign checkpoint on one task, score it on the dev set.

Data come from a local copy made with Hugging Face `datasets` (this machine has no hub):
``datasets.load_dataset("nyu-mll/glue", "cola").save_to_disk("glue/cola")``. Each task is
scored with its official metric (MCC for CoLA, Pearson/Spearman for STS-B, F1 and accuracy
for MRPC/QQP, accuracy otherwise); a task's score is the mean of its metrics over its dev
splits, the GLUE score the mean of the task scores.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..model.factory import load
from ..model.smke import SMKE, TEXT
from .finetune import fit
from .specs import GLUE_DEFAULTS, GLUE_TASKS, EvalError, FinetuneConfig, GlueTask
from .run import default_device, result_header


# ---------------------------------------------------------------------------------------
# Metrics (numpy, so scoring needs neither scipy nor scikit-learn)


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float((pred == label).mean())


def _confusion(pred: np.ndarray, label: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, tn, fp, fn) with class 1 as positive (MRPC/QQP: paraphrase, CoLA: acceptable)."""
    p, t = pred == 1, label == 1
    return int((p & t).sum()), int((~p & ~t).sum()), int((p & ~t).sum()), int((~p & t).sum())


def f1(pred: np.ndarray, label: np.ndarray) -> float:
    tp, _, fp, fn = _confusion(pred, label)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def mcc(pred: np.ndarray, label: np.ndarray) -> float:
    """Matthews correlation; 0 when a row or column of the confusion matrix is empty (sklearn's convention)."""
    tp, tn, fp, fn = _confusion(pred, label)
    denom = float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / np.sqrt(denom) if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom else 0.0


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_average_ranks(x), _average_ranks(y))


_METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}


def glue_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's official metrics (percent). `predictions`: class ids, or scores for STS-B."""
    spec = _task(task)
    return {name: 100.0 * _METRICS[name](np.asarray(predictions), np.asarray(labels)) for name in spec.metrics}


def task_score(metrics_by_split: dict[str, dict[str, float]]) -> float:
    """Mean of a task's metrics over its dev splits (MRPC: (F1 + acc) / 2; MNLI: (m + mm) / 2)."""
    values = [v for metrics in metrics_by_split.values() for v in metrics.values()]
    return sum(values) / len(values)


def _task(task: str) -> GlueTask:
    if task not in GLUE_TASKS:
        raise EvalError(f"unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[task]


# ---------------------------------------------------------------------------------------
# Model and data


class TextClassifier(nn.Module):
    """Text tower (with segment ids for pairs) -> shared block -> CLS -> pooler (Linear + tanh) -> Linear.

    The pooler is new: the towers are cut without BERT's pooler, as the paper prescribes.
    """

    def __init__(self, model: SMKE, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.smke = model
        width = model.width
        self.pooler = nn.Linear(width, width)  # followed by tanh, as BERT's
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_labels)
        for layer in (self.pooler, self.head):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.smke.text_tower(tokens["input_ids"], tokens["attention_mask"], tokens.get("token_type_ids"))
        keep = tokens["attention_mask"].bool()[:, None, None, :]
        out, _ = self.smke.forward_tokens(self.smke.text_proj(hidden), TEXT, keep)
        cls = out[:, 0]
        return self.head(self.dropout(torch.tanh(self.pooler(cls))))

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        skip = ("smke.image_tower.", "smke.kd_head.", "smke.logit_scale")
        return [(n, p) for n, p in self.named_parameters() if not n.startswith(skip)]


def load_glue_task(path: str | Path, task: str) -> Any:
    """The task's DatasetDict saved with `save_to_disk`, checked for the columns and splits the task needs."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise EvalError("GLUE needs the `datasets` package: pip install 'unialign[eval]'") from None
    spec = _task(task)
    path = Path(path)
    if not (path / "dataset_dict.json").is_file():
        raise EvalError(f"GLUE data {path} is not a DatasetDict saved with save_to_disk (no dataset_dict.json); "
                        f"make one with datasets.load_dataset('nyu-mll/glue', '{task}').save_to_disk('{path}')")
    data = load_from_disk(str(path))
    assert isinstance(data, DatasetDict)
    for split in ("train", *spec.eval_splits):
        if split not in data:
            raise EvalError(f"GLUE data {path}: split '{split}' is missing (splits: {sorted(data)})")
        needed = [k for k in (*spec.text_keys, "label") if k is not None]
        missing = [k for k in needed if k not in data[split].column_names]
        if missing:
            raise EvalError(f"GLUE data {path}: split '{split}' has no field '{missing[0]}' "
                            f"(fields: {data[split].column_names}); is it task {task!r}?")
    return data


class _Collate:
    """Rows -> padded token tensors + labels; pairs are tokenized together so BERT sees [SEP] and segment ids."""

    def __init__(self, tokenizer: Any, spec: GlueTask, max_length: int) -> None:
        self.tokenizer, self.spec, self.max_length = tokenizer, spec, max_length

    def __call__(self, rows: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        first, second = self.spec.text_keys
        out = self.tokenizer([r[first] for r in rows], [r[second] for r in rows] if second else None,
                             padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        tokens = {k: out[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in out}
        dtype = torch.float32 if self.spec.num_labels == 1 else torch.long
        return tokens, torch.tensor([r["label"] for r in rows], dtype=dtype)


def finetune_glue(checkpoint: str | Path, data_path: str | Path, task: str, cfg: FinetuneConfig | None = None,
                  max_length: int = 128, dropout: float = 0.1, num_workers: int = 0, device: str | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Fine-tune text tower + shared block + head on `task`; dev metrics after every epoch, the last reported."""
    spec = _task(task)
    cfg = cfg or GLUE_DEFAULTS
    torch.manual_seed(cfg.seed)
    dev = torch.device(device or default_device())
    data = load_glue_task(data_path, task)
    smke, _, text_tokenizer = load(checkpoint, device=dev)
    module = TextClassifier(smke, spec.num_labels, dropout).to(dev)
    collate = _Collate(text_tokenizer.tokenizer, spec, max_length)
    train_loader = DataLoader(data["train"], batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                              num_workers=num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    eval_loaders = {s: DataLoader(data[s], batch_size=cfg.batch_size, collate_fn=collate, num_workers=num_workers)
                    for s in spec.eval_splits}

    def on_device(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dev) for k, v in tokens.items()}

    def loss_of(batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        tokens, labels = batch
        out = module(on_device(tokens))
        if spec.num_labels == 1:
            return F.mse_loss(out.squeeze(-1).float(), labels.to(dev))
        return F.cross_entropy(out, labels.to(dev), label_smoothing=cfg.label_smoothing)

    def evaluate() -> dict[str, Any]:
        by_split = {}
        for split, loader in eval_loaders.items():
            preds, labels = [], []
            for tokens, y in loader:
                out = module(on_device(tokens)).float().cpu()
                preds.append(out.squeeze(-1) if spec.num_labels == 1 else out.argmax(dim=-1))
                labels.append(y)
            by_split[split] = glue_metrics(task, torch.cat(preds).numpy(), torch.cat(labels).numpy())
        return {"metrics": by_split, "score": task_score(by_split)}

    history = fit(module, module.trainable(), train_loader, loss_of, evaluate, cfg, dev, progress)
    last = history[-1]
    return {
        **result_header("glue", str(checkpoint), f"glue/{task}"),
        "glue_task": task,
        "score": last["score"],
        "metrics": last["metrics"],
        "history": history,
        "config": {**asdict(cfg), "max_length": max_length, "dropout": dropout},
        "n_train": len(data["train"]),
        "n_eval": {s: len(data[s]) for s in spec.eval_splits},
    }

