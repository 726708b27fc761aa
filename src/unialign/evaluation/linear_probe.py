"""Linear probe: multinomial logistic regression on frozen image embeddings (CLIP's protocol).

CLIP fits scikit-learn's L-BFGS logistic regression and picks the L2 strength on a held-out
validation split. This does the same in torch (full-batch L-BFGS, so it runs on the GPU
for ImageNet-sized feature sets) and needs no extra dependency: the objective is
``mean cross-entropy + l2/2 * ||W||^2`` (bias not penalised), which is scikit-learn's with
``C = 1 / (n_train * l2)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .classification import classification_metrics, default_dataset_name, image_features, read_classification
from .models import EvalError, EvalModel
from .run import result_header

log = logging.getLogger(__name__)

DEFAULT_L2_GRID: tuple[float, ...] = tuple(10.0 ** e for e in range(-8, 1))  # one per decade, 1e-8 .. 1


@dataclass
class LinearClassifier:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight) @ self.weight.T + self.bias


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 1000,
                 init: LinearClassifier | None = None) -> LinearClassifier:
    """Minimise mean CE + l2/2 ||W||^2 with full-batch L-BFGS (strong Wolfe), from `init` if given (warm start).

    float64 on the CPU (exact enough to match scikit-learn), float32 on accelerators (ImageNet-sized
    feature sets must fit in their memory).
    """
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"need features (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.to(torch.float64 if x.device.type == "cpu" else torch.float32)
    y = y.to(x.device)
    weight = (init.weight.clone() if init else torch.zeros(num_classes, x.shape[1])).to(x).requires_grad_(True)
    bias = (init.bias.clone() if init else torch.zeros(num_classes)).to(x).requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearClassifier(weight.detach(), bias.detach())


def _accuracy(clf: LinearClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((clf.logits(x).argmax(dim=1) == y.to(clf.weight.device)).double().mean())


def select_l2(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
              num_classes: int, grid: Sequence[float] = DEFAULT_L2_GRID, refine_steps: int = 4,
              max_iter: int = 1000) -> tuple[float, list[dict[str, float]]]:
    """Best L2 strength by validation accuracy: a coarse log grid, then a finer log grid around the best
    (CLIP also searches coarse-to-fine). Ties go to the stronger regularisation. Returns (l2, sweep log)."""
    def score(l2: float, init: LinearClassifier | None) -> tuple[float, LinearClassifier]:
        clf = fit_logistic(x_train, y_train, num_classes, l2, max_iter, init)
        return _accuracy(clf, x_val, y_val), clf

    grid = sorted(grid, reverse=True)  # strong -> weak regularisation: each fit warm-starts the next
    sweep, prev = [], None
    for l2 in grid:
        acc, prev = score(l2, prev)
        sweep.append({"l2": l2, "val_acc": 100.0 * acc})
    best_i = max(range(len(grid)), key=lambda i: (sweep[i]["val_acc"], grid[i]))
    if refine_steps > 0 and len(grid) > 1:
        lo = math.log10(grid[min(best_i + 1, len(grid) - 1)])
        hi = math.log10(grid[max(best_i - 1, 0)])
        fine = [10 ** (hi - (hi - lo) * k / (2 * refine_steps)) for k in range(2 * refine_steps + 1)]
        for l2 in fine:
            if all(not math.isclose(l2, s["l2"], rel_tol=1e-9) for s in sweep):
                sweep.append({"l2": l2, "val_acc": 100.0 * score(l2, None)[0]})
    best = max(sweep, key=lambda s: (s["val_acc"], s["l2"]))
    return best["l2"], sorted(sweep, key=lambda s: -s["l2"])


def split_train_val(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """A fixed random hold-out of the training set for choosing the regularisation."""
    if not 0 < val_fraction < 1:
        raise EvalError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise EvalError(f"training set of {n} images is too small to hold out a validation split")
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def evaluate_linear_probe(model: EvalModel, train_dataset: str | Path, test_dataset: str | Path,
                          fmt: str = "folder", class_map: str | Path | None = None, val_fraction: float = 0.2,
                          l2_grid: Sequence[float] = DEFAULT_L2_GRID, max_iter: int = 1000,
                          dataset_name: str | None = None, batch_size: int = 64, num_workers: int = 0,
                          seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Choose L2 on a validation split of train, refit on all of train, report test top-1/top-5 (percent)."""
    train = read_classification(train_dataset, fmt, "train", class_map)
    test = read_classification(test_dataset, fmt, "test", class_map)
    if train.classes != test.classes:
        raise EvalError(f"train {train.source} and test {test.source} have different classes "
                        f"({len(train.classes)} vs {len(test.classes)})")
    x_train, y_train, skipped_train = image_features(model, train, batch_size, num_workers, progress)
    x_test, y_test, skipped_test = image_features(model, test, batch_size, num_workers, progress)
    device = model.device
    x_train, y_train, x_test = x_train.to(device), y_train.to(device), x_test.to(device)
    fit_idx, val_idx = split_train_val(len(y_train), val_fraction, seed)
    n_classes = len(train.classes)
    l2, sweep = select_l2(x_train[fit_idx], y_train[fit_idx], x_train[val_idx], y_train[val_idx], n_classes,
                          l2_grid, max_iter=max_iter)
    log.info("linear probe: chose l2=%.3g on %d validation images", l2, len(val_idx))
    clf = fit_logistic(x_train, y_train, n_classes, l2, max_iter)
    metrics = classification_metrics(clf.logits(x_test).float().cpu(), y_test)
    return {
        **result_header("linear_probe", model.name, dataset_name or default_dataset_name(test_dataset, fmt)),
        **metrics,
        "l2": l2,
        "sklearn_C": 1.0 / (len(y_train) * l2),
        "sweep": sweep,
        "n_train": len(y_train),
        "n_val": len(val_idx),
        "n_test": int(y_test.numel()),
        "n_classes": n_classes,
        "images_skipped": len(skipped_train) + len(skipped_test),
        "skipped": [{"image": p, "reason": r} for p, r in skipped_train + skipped_test],
    }
