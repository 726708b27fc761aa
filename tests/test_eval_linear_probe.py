"""Linear probe: the torch logistic regression equals scikit-learn's, the L2 sweep and the end-to-end run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval_support import ColourModel, write_cifar

from unialign.evaluation.linear_probe import evaluate_linear_probe, fit_logistic, select_l2, split_train_val
from unialign.evaluation.models import EvalError


def _blobs(n: int, seed: int, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    y = torch.randint(0, 3, (n,), generator=gen)
    return centres[y] + noise * torch.randn(n, 4, generator=gen), y


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_matches_sklearn_logistic_regression(l2: float) -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(120, seed=0)
    clf = fit_logistic(x, y, 3, l2)
    ref = linear_model.LogisticRegression(C=1.0 / (len(y) * l2), tol=1e-10, max_iter=10000).fit(x.numpy(), y.numpy())
    probs = torch.softmax(clf.logits(x), dim=1).numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(x.numpy()), atol=2e-4)


def test_sweep_picks_the_strongest_l2_with_the_best_validation_accuracy() -> None:
    # Imbalanced classes (3:1) separated by a small-scale feature: a strong L2 shrinks the weights
    # until the bias alone predicts the majority class (75%); weaker ones separate the classes.
    def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        y = (torch.arange(n) % 4 == 0).long()
        x = torch.stack([0.1 * (2 * y.float() - 1) + 0.01 * torch.randn(n, generator=gen),
                         0.01 * torch.randn(n, generator=gen)], dim=1)
        return x, y

    (x_tr, y_tr), (x_val, y_val) = data(40, 0), data(40, 1)
    l2, sweep = select_l2(x_tr, y_tr, x_val, y_val, 2, grid=(10.0, 1.0, 1e-2, 1e-4, 1e-6), refine_steps=2,
                          max_iter=100)
    by_l2 = {s["l2"]: s["val_acc"] for s in sweep}
    assert by_l2[10.0] == 75.0 and by_l2[1e-6] == 100.0
    assert by_l2[l2] == 100.0
    assert all(acc < 100.0 for value, acc in by_l2.items() if value > l2)  # strongest of the best
    assert [s["l2"] for s in sweep] == sorted(by_l2, reverse=True)
    assert len(sweep) > 5  # the refinement added points around the coarse winner


def test_split_is_fixed_and_disjoint() -> None:
    fit, val = split_train_val(10, 0.3, seed=1)
    assert (fit, val) == split_train_val(10, 0.3, seed=1)
    assert len(val) == 3 and sorted(fit + val) == list(range(10))
    with pytest.raises(EvalError, match="val_fraction"):
        split_train_val(10, 1.5)


def test_linear_probe_end_to_end(tmp_path: Path) -> None:
    # colours a linear classifier separates; the probe must get every test image right
    gen = np.random.default_rng(0)
    classes = ["reddish", "greenish"]

    def items(n: int) -> list:
        out = []
        for i in range(n):
            label = i % 2
            jitter = tuple(float(v) for v in gen.uniform(0, 0.3, 3))
            rgb = (0.7 + jitter[0], jitter[1], jitter[2]) if label == 0 else (jitter[0], 0.7 + jitter[1], jitter[2])
            out.append((rgb, label))
        return out

    root = write_cifar(tmp_path / "cifar-100-python", "cifar100", classes, items(30), items(10))
    result = evaluate_linear_probe(ColourModel(), root, root, "cifar100", val_fraction=0.3, max_iter=100,
                                   progress=False)
    assert result["top1"] == 100.0
    assert (result["task"], result["dataset"]) == ("linear_probe", "cifar100")
    assert (result["n_train"], result["n_val"], result["n_test"]) == (30, 9, 10)
    assert result["l2"] in [s["l2"] for s in result["sweep"]]
    assert result["sklearn_C"] == pytest.approx(1 / (30 * result["l2"]))
