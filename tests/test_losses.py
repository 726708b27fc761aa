"""Single-process tests of the ITC / KD losses and the memory bank.

Reference values are computed independently in float64 NumPy with explicit
per-row loops, never by calling the library code.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unialign.losses import (
    ContrastiveDistillationLoss,
    ContrastiveLoss,
    MemoryBank,
    MSEDistillationLoss,
    soft_targets,
)


def _normed(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _np_normed(x: torch.Tensor) -> np.ndarray:
    a = x.detach().double().numpy()
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _ref_ce(logits: np.ndarray, positives: np.ndarray) -> float:
    """Mean over rows of -sum_j p_ij log softmax_ij with p uniform over positives."""
    total = 0.0
    for row, pos in zip(logits, positives):
        m = row.max()
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        p = pos / pos.sum()
        total += -sum(pj * (v - lse) for pj, v in zip(p, row))
    return total / len(logits)


def _id_mask(row_ids: list[int], col_ids: list[int]) -> np.ndarray:
    return np.array([[float(r == c) for c in col_ids] for r in row_ids])


# ---------------------------------------------------------------- ITC


def test_soft_targets_rows_uniform_over_matches() -> None:
    t = soft_targets(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 0, 2]))
    expected = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0]])
    torch.testing.assert_close(t, expected)


@pytest.mark.parametrize("ids", [None, [0, 1, 2, 3, 4, 5], [0, 1, 0, 2, 1, 3]])
def test_itc_matches_reference(ids: list[int] | None) -> None:
    img, txt = _normed(6, 8, seed=0), _normed(6, 8, seed=1)
    scale = torch.tensor(7.5)
    id_tensor = None if ids is None else torch.tensor(ids)
    loss = ContrastiveLoss()(img, txt, scale, id_tensor)

    i, t = img.double().numpy(), txt.double().numpy()
    sim = 7.5 * i @ t.T
    mask = np.eye(6) if ids is None else _id_mask(ids, ids)
    expected = (_ref_ce(sim, mask) + _ref_ce(sim.T, mask)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_itc_unique_ids_equal_clip_loss() -> None:
    img, txt = _normed(5, 4, seed=2), _normed(5, 4, seed=3)
    scale = torch.tensor(20.0)
    with_ids = ContrastiveLoss()(img, txt, scale, torch.tensor([7, 3, 9, 1, 4]))
    without_ids = ContrastiveLoss()(img, txt, scale)
    torch.testing.assert_close(with_ids, without_ids)


def test_itc_same_image_captions_are_positives() -> None:
    # Two pairs of the same image (two views/captions), scale 1:
    # every row has logits {1, 0}; with both columns positive (targets 1/2, 1/2)
    # each row costs log(1 + e) - 1/2, whereas treating the other caption as a
    # negative would give log(1 + e) - 1.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scale = torch.tensor(1.0)
    loss = ContrastiveLoss()(img, txt, scale, torch.tensor([4, 4]))
    assert loss.item() == pytest.approx(math.log(1 + math.e) - 0.5, rel=1e-6)
    distinct = ContrastiveLoss()(img, txt, scale)
    assert distinct.item() == pytest.approx(math.log(1 + math.e) - 1.0, rel=1e-6)


def _ref_itc_torch(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, ids: list[int]
) -> torch.Tensor:
    """Row-by-row float64 soft-target InfoNCE, differentiable for gradient checks."""
    n = len(ids)
    terms = []
    for a, b in ((img, txt), (txt, img)):
        for i in range(n):
            row = torch.stack([scale * torch.dot(a[i], b[j]) for j in range(n)])
            pos = [j for j in range(n) if ids[j] == ids[i]]
            terms.append(torch.logsumexp(row, 0) - sum(row[j] for j in pos) / len(pos))
    return torch.stack(terms).sum() / (2 * n)


@pytest.mark.parametrize("ids", [None, [0, 1, 0, 2]])
def test_itc_gradients_match_reference(ids: list[int] | None) -> None:
    img = _normed(4, 3, seed=4).requires_grad_()
    txt = _normed(4, 3, seed=5).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    ContrastiveLoss()(img, txt, scale, None if ids is None else torch.tensor(ids)).backward()

    ref_img = img.detach().double().requires_grad_()
    ref_txt = txt.detach().double().requires_grad_()
    ref_scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    _ref_itc_torch(ref_img, ref_txt, ref_scale, list(range(4)) if ids is None else ids).backward()
    for got, want in ((img, ref_img), (txt, ref_txt), (scale, ref_scale)):
        assert got.grad is not None
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- memory bank


def test_bank_starts_empty() -> None:
    bank = MemoryBank(5, 3)
    targets, ids = bank.valid()
    assert len(bank) == 0 and targets.shape == (0, 3) and ids.shape == (0,)


def test_bank_exposes_only_enqueued_entries_before_full() -> None:
    bank = MemoryBank(5, 2)
    x = torch.arange(6.0).view(3, 2) + 1
    bank.enqueue(x, torch.tensor([10, 11, 12]))
    targets, ids = bank.valid()
    assert len(bank) == 3 and int(bank.ptr) == 3
    torch.testing.assert_close(targets, x)
    assert ids.tolist() == [10, 11, 12]
    assert (targets != 0).all()


def test_bank_fifo_wraparound() -> None:
    bank = MemoryBank(5, 1)
    bank.enqueue(torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([0, 1, 2]))
    bank.enqueue(torch.tensor([[3.0], [4.0], [5.0], [6.0]]), torch.tensor([3, 4, 5, 6]))
    # slots 3, 4 then wrap to 0, 1; the two oldest entries (0, 1) are overwritten
    assert bank.targets.squeeze(1).tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    assert int(bank.ptr) == 2 and len(bank) == 5
    targets, ids = bank.valid()
    assert targets.squeeze(1).tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert ids.tolist() == [2, 3, 4, 5, 6]


def test_bank_enqueue_larger_than_size_keeps_last_entries() -> None:
    bank = MemoryBank(5, 1)
    bank.enqueue(torch.tensor([[100.0], [101.0]]), torch.tensor([100, 101]))
    x = torch.arange(12.0).view(12, 1)
    bank.enqueue(x, torch.arange(12))
    targets, ids = bank.valid()
    assert targets.squeeze(1).tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert ids.tolist() == [7, 8, 9, 10, 11]
    assert int(bank.ptr) == (2 + 12) % 5


def test_bank_matches_deque_model() -> None:
    size, dim = 7, 3
    bank = MemoryBank(size, dim)
    model: deque[tuple[list[float], int]] = deque(maxlen=size)
    g = torch.Generator().manual_seed(0)
    next_id = 0
    for n in [1, 3, 0, 5, 2, 9, 4, 7, 7, 1]:
        x = torch.randn(n, dim, generator=g)
        ids = torch.arange(next_id, next_id + n)
        next_id += n
        bank.enqueue(x, ids)
        model.extend(zip(x.tolist(), ids.tolist()))
        targets, got_ids = bank.valid()
        assert len(bank) == len(model)
        assert got_ids.tolist() == [i for _, i in model]
        torch.testing.assert_close(targets, torch.tensor([v for v, _ in model]).view(-1, dim))


def test_bank_stores_float32_detached() -> None:
    bank = MemoryBank(4, 2)
    x = torch.ones(2, 2, dtype=torch.bfloat16, requires_grad=True)
    bank.enqueue(x, torch.tensor([0, 1], dtype=torch.int32))
    assert bank.targets.dtype == torch.float32 and bank.image_ids.dtype == torch.int64
    assert not bank.targets.requires_grad


def test_bank_size_zero() -> None:
    bank = MemoryBank(0, 4)
    bank.enqueue(torch.randn(3, 4), torch.arange(3))
    targets, ids = bank.valid()
    assert len(bank) == 0 and targets.shape == (0, 4) and ids.shape == (0,)


def test_bank_state_dict_round_trip() -> None:
    bank = MemoryBank(6, 3)
    bank.enqueue(torch.randn(4, 3), torch.arange(4))
    bank.enqueue(torch.randn(5, 3), torch.arange(4, 9))
    state = bank.state_dict()
    assert set(state) == {"targets", "image_ids", "ptr", "count"}

    restored = MemoryBank(6, 3)
    restored.load_state_dict(state)
    for name in ("targets", "image_ids", "ptr", "count"):
        assert torch.equal(getattr(restored, name), getattr(bank, name))
    # resumed training continues exactly where it stopped
    nxt = torch.randn(2, 3)
    bank.enqueue(nxt, torch.tensor([9, 10]))
    restored.enqueue(nxt, torch.tensor([9, 10]))
    for a, b in zip(bank.valid(), restored.valid()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- KD


def _ref_kd(
    s_img: torch.Tensor,
    s_txt: torch.Tensor,
    candidates: np.ndarray,
    positives: np.ndarray,
    temperature: float,
) -> float:
    li = _np_normed(s_img) @ candidates.T / temperature
    lt = _np_normed(s_txt) @ candidates.T / temperature
    return (_ref_ce(li, positives) + _ref_ce(lt, positives)) / 2


def test_kd_in_batch_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    s_img, s_txt, t = (torch.randn(5, 6, generator=g) * 3 for _ in range(3))
    loss = ContrastiveDistillationLoss(6, bank_size=0)(s_img, s_txt, t)
    expected = _ref_kd(s_img, s_txt, _np_normed(t), np.eye(5), 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_with_bank_and_ids_matches_reference() -> None:
    batch, dim, size = 4, 6, 6
    kd = ContrastiveDistillationLoss(dim, bank_size=size, temperature=0.1)
    g = torch.Generator().manual_seed(1)
    history: deque[tuple[np.ndarray, int]] = deque(maxlen=size)
    id_batches = [[0, 1, 2, 3], [4, 1, 5, 6], [1, 7, 4, 8]]
    for step, ids in enumerate(id_batches):
        s_img, s_txt = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
        t = torch.randn(batch, dim, generator=g) * 5
        loss = kd(s_img, s_txt, t, torch.tensor(ids))

        t_np = _np_normed(t)
        bank_vecs = [v for v, _ in history]
        candidates = np.concatenate([t_np, np.array(bank_vecs).reshape(-1, dim)])
        col_ids = ids + [i for _, i in history]
        expected = _ref_kd(s_img, s_txt, candidates, _id_mask(ids, col_ids), 0.1)
        assert loss.item() == pytest.approx(expected, rel=1e-5), f"step {step}"
        history.extend(zip(t_np, ids))

    # the bank wrapped: 12 targets went into 6 slots
    assert len(kd.bank) == size
    torch.testing.assert_close(
        kd.bank.valid()[0].double(), torch.from_numpy(np.array([v for v, _ in history]))
    )


def test_kd_bank_same_image_is_positive() -> None:
    # the bank holds the target of image 3; a new caption of image 3 must treat
    # it as a positive, not a negative
    kd = ContrastiveDistillationLoss(2, bank_size=4, temperature=1.0)
    kd(torch.randn(1, 2), torch.randn(1, 2), torch.tensor([[0.0, 1.0]]), torch.tensor([3]))
    s = torch.tensor([[1.0, 0.0]])
    loss = kd(s, s, torch.tensor([[1.0, 0.0]]), torch.tensor([3]))
    # logits {1 (batch target), 0 (bank target)}, both positive -> log(1+e) - 1/2
    assert loss.item() == pytest.approx(math.log(1 + math.e) - 0.5, rel=1e-6)


def test_kd_eval_mode_does_not_enqueue_and_train_enqueues_normalised() -> None:
    kd = ContrastiveDistillationLoss(3, bank_size=8)
    x = torch.randn(2, 3)
    kd.eval()
    kd(x, x, x * 4)
    assert len(kd.bank) == 0
    kd.train()
    kd(x, x, x * 4)
    targets, ids = kd.bank.valid()
    assert len(kd.bank) == 2
    torch.testing.assert_close(targets.norm(dim=1), torch.ones(2))
    assert ids.tolist() == [-1, -1]


def test_kd_state_dict_contains_bank_and_round_trips() -> None:
    kd = ContrastiveDistillationLoss(3, bank_size=4, learnable_temperature=True)
    kd(torch.randn(3, 3), torch.randn(3, 3), torch.randn(3, 3), torch.arange(3))
    state = kd.state_dict()
    bank_keys = {"bank.targets", "bank.image_ids", "bank.ptr", "bank.count"}
    assert bank_keys | {"log_inv_temperature"} <= set(state)
    other = ContrastiveDistillationLoss(3, bank_size=4, learnable_temperature=True)
    other.load_state_dict(state)
    for a, b in zip(kd.bank.valid(), other.bank.valid()):
        assert torch.equal(a, b)


def test_kd_learnable_temperature_gets_gradient_and_is_clamped() -> None:
    kd = ContrastiveDistillationLoss(4, bank_size=0, learnable_temperature=True)
    assert kd.log_inv_temperature.item() == pytest.approx(math.log(1 / 0.07))
    g = torch.Generator().manual_seed(2)
    s_img, s_txt, t = (torch.randn(3, 4, generator=g) for _ in range(3))
    loss = kd(s_img, s_txt, t)
    expected = _ref_kd(s_img, s_txt, _np_normed(t), np.eye(3), 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert kd.log_inv_temperature.grad is not None
    assert kd.log_inv_temperature.grad.abs() > 0

    # Clamped as a parameter after the optimiser step (the training module calls this), not in the
    # graph: past the cap the gradient still flows, so the temperature can come back.
    with torch.no_grad():
        kd.log_inv_temperature.fill_(10.0)
    kd.zero_grad()
    kd(s_img, s_txt, t).backward()
    assert kd.log_inv_temperature.grad.abs() > 0
    kd.clamp_temperature_()
    assert kd.logit_scale().item() == pytest.approx(100.0)
    with torch.no_grad():
        kd.log_inv_temperature.fill_(-3.0)
    kd.clamp_temperature_()
    assert kd.logit_scale().item() == pytest.approx(1.0)


def test_kd_fixed_temperature_is_not_a_parameter() -> None:
    kd = ContrastiveDistillationLoss(4, bank_size=0, temperature=0.05)
    assert list(kd.parameters()) == []
    assert kd.logit_scale().item() == pytest.approx(20.0)


def test_kd_gradient_only_reaches_student() -> None:
    s_img = torch.randn(3, 4, requires_grad=True)
    s_txt = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    ContrastiveDistillationLoss(4, bank_size=16)(s_img, s_txt, t).backward()
    assert s_img.grad is not None and s_txt.grad is not None
    assert t.grad is None


def test_mse_distillation_value() -> None:
    g = torch.Generator().manual_seed(3)
    s_img, s_txt, t = (torch.randn(4, 5, generator=g) for _ in range(3))
    loss = MSEDistillationLoss()(s_img, s_txt, t)
    tn = _np_normed(t)
    expected = 0.5 * (
        ((_np_normed(s_img) - tn) ** 2).mean() + ((_np_normed(s_txt) - tn) ** 2).mean()
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
