"""Two-rank (gloo, CPU) runs of the losses must reproduce one big-batch process.

Gradient relation checked here: rank r returns L_r, the mean over its local
rows, so ``L_full = mean_r L_r``. Gathering with autograd makes the gradient a
rank receives for its *local* features equal to ``d(sum_r L_r)/df``
``= world_size * dL_full/df`` (for KD the student is not gathered, but
``dL_r/ds_r = world_size * dL_full/ds_r`` as well). Gradients of shared scalars
(logit scale, learnable temperature) on each rank are ``dL_r/dp``; their mean
over ranks, which is what DDP applies, equals ``dL_full/dp``.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unialign.losses import ContrastiveDistillationLoss, ContrastiveLoss

WORLD = 2
BATCH = 6  # global batch; each rank gets BATCH // WORLD rows
DIM = 8
BANK = 10  # small enough that the 3 KD steps wrap around
KD_STEPS = 3


def _make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "img": torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=g), dim=-1),
        "txt": torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=g), dim=-1),
        # duplicate ids across the two ranks' halves exercise id gathering
        "ids": torch.tensor([0, 1, 2, 1, 3, 0]),
        "kd_img": torch.randn(KD_STEPS, BATCH, DIM, generator=g),
        "kd_txt": torch.randn(KD_STEPS, BATCH, DIM, generator=g),
        "kd_t": torch.randn(KD_STEPS, BATCH, DIM, generator=g),
        "kd_ids": torch.tensor([[0, 1, 2, 3, 4, 5], [6, 2, 7, 0, 8, 9], [1, 6, 10, 11, 5, 12]]),
    }


def _run(data: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, Any]:
    """Compute every loss on this rank's shard; shared by workers and the reference."""
    local = BATCH // world
    sl = slice(rank * local, (rank + 1) * local)
    out: dict[str, Any] = {}

    itc = ContrastiveLoss()
    for use_ids in (False, True):
        img = data["img"][sl].clone().requires_grad_()
        txt = data["txt"][sl].clone().requires_grad_()
        scale = torch.tensor(12.0, requires_grad=True)
        loss = itc(img, txt, scale, data["ids"][sl] if use_ids else None)
        loss.backward()
        out[f"itc{use_ids}"] = (loss.detach(), img.grad, txt.grad, scale.grad)

    for use_ids in (False, True):
        kd = ContrastiveDistillationLoss(DIM, bank_size=BANK, learnable_temperature=True)
        for step in range(KD_STEPS):
            s_img = data["kd_img"][step, sl].clone().requires_grad_()
            s_txt = data["kd_txt"][step, sl].clone().requires_grad_()
            kd.zero_grad()
            ids = data["kd_ids"][step, sl] if use_ids else None
            loss = kd(s_img, s_txt, data["kd_t"][step, sl], ids)
            loss.backward()
            grad_t = kd.log_inv_temperature.grad.clone()
            out[f"kd{use_ids}{step}"] = (loss.detach(), s_img.grad, s_txt.grad, grad_t)
        out[f"bank{use_ids}"] = {k: v.clone() for k, v in kd.bank.state_dict().items()}
    return out


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        data = torch.load(f"{tmp}/inputs.pt")
        torch.save(_run(data, rank, world), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    tmp: Path = tmp_path_factory.mktemp("dist")
    data = _make_inputs()
    torch.save(data, tmp / "inputs.pt")
    mp.spawn(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return _run(data, 0, 1), ranks


def _check(single: tuple, ranks: list[tuple]) -> None:
    loss, g_a, g_b, g_scalar = single
    torch.testing.assert_close(torch.stack([r[0] for r in ranks]).mean(), loss)
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]) / WORLD, g_a)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / WORLD, g_b)
    torch.testing.assert_close(torch.stack([r[3] for r in ranks]).mean(0), g_scalar)


@pytest.mark.parametrize("use_ids", [False, True])
def test_itc_two_ranks_match_single_process(results: tuple, use_ids: bool) -> None:
    single, ranks = results
    _check(single[f"itc{use_ids}"], [r[f"itc{use_ids}"] for r in ranks])


@pytest.mark.parametrize("use_ids", [False, True])
@pytest.mark.parametrize("step", range(KD_STEPS))
def test_kd_two_ranks_match_single_process(results: tuple, use_ids: bool, step: int) -> None:
    single, ranks = results
    key = f"kd{use_ids}{step}"
    _check(single[key], [r[key] for r in ranks])


@pytest.mark.parametrize("use_ids", [False, True])
def test_memory_banks_identical_across_ranks_and_single_process(
    results: tuple, use_ids: bool
) -> None:
    single, ranks = results
    bank = single[f"bank{use_ids}"]
    assert int(bank["count"]) == BANK
    for rank in ranks:
        for name, value in bank.items():
            assert torch.equal(rank[f"bank{use_ids}"][name], value), name
