"""ALBEF's momentum model, ITC feature queues and momentum distillation (loss.queue_size, loss.mod_alpha).

The expected losses are computed row by row below, independently of `MomentumContrastiveLoss`."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import tiny_config_dict
from unialign.config import Config, LossConfig, parse_config
from unialign.losses.momentum import MomentumContrastiveLoss

# Lightning and the task are imported inside the tests that use them: the two spawned ranks
# import this module, and their start-up should not pay for them.

DIM = 8
WORLD = 2
BATCH = 6  # global batch of the two-rank test; each rank gets 3 rows
QUEUE = 10  # small enough that the steps below wrap it around
STEPS = 3


def _unit(*shape: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _reference(s_img, s_txt, m_img, m_txt, scale, ids, queue, alpha, use_queue):
    """The loss written out plainly: one row at a time, candidates listed, positives by image id."""
    q_img, q_txt, q_ids = queue
    cand_m_img, cand_m_txt = torch.cat([m_img, q_img]), torch.cat([m_txt, q_txt])
    cand_img, cand_txt = (cand_m_img, cand_m_txt) if use_queue else (s_img, s_txt)
    cand_ids = ids.tolist() + q_ids.tolist()
    total = 0.0
    for i in range(len(ids)):
        hard = torch.tensor([1.0 if c == int(ids[i]) else 0.0 for c in cand_ids])
        hard = hard / hard.sum()
        for query, cand, m_query, m_cand in ((s_img[i], cand_txt, m_img[i], cand_m_txt),
                                             (s_txt[i], cand_img, m_txt[i], cand_m_img)):
            target = hard
            if alpha > 0:
                target = (1 - alpha) * hard + alpha * torch.softmax(scale * (m_cand @ m_query), dim=0)
            total = total - (target * torch.log_softmax(scale * (cand @ query), dim=0)).sum() / 2
    return total / len(ids)


@pytest.mark.parametrize("use_queue,alpha", [(True, 0.0), (True, 0.4), (False, 0.4)])
def test_loss_matches_a_plain_computation_with_same_image_positives(use_queue: bool, alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    loss_fn = MomentumContrastiveLoss(DIM, QUEUE if use_queue else 0)
    queue = (torch.empty(0, DIM), torch.empty(0, DIM), torch.empty(0, dtype=torch.int64))
    # ids repeat within a batch and across steps, so queue entries are positives too
    batches = [torch.tensor([0, 1, 1, 2]), torch.tensor([3, 0, 4, 2]), torch.tensor([1, 5, 3, 3]),
               torch.tensor([2, 6, 0, 7])]
    for ids in batches:
        s_img, s_txt, m_img, m_txt = (_unit(4, DIM, g=g) for _ in range(4))
        scale = torch.tensor(7.0)
        got = loss_fn(s_img, s_txt, m_img, m_txt, scale, ids, alpha)
        expected = _reference(s_img, s_txt, m_img, m_txt, 7.0, ids, queue, alpha, use_queue)
        torch.testing.assert_close(got, expected)
        if use_queue:  # what the queues should hold next: the newest QUEUE entries, oldest first
            queue = tuple(torch.cat([q, new])[-QUEUE:] for q, new in zip(queue, (m_img, m_txt, ids)))
    if use_queue:
        assert len(loss_fn.image_queue) == QUEUE  # 16 enqueued: wrapped around


def test_loss_without_image_ids_has_only_the_own_pair_as_positive() -> None:
    g = torch.Generator().manual_seed(1)
    loss_fn = MomentumContrastiveLoss(DIM, QUEUE)
    first = [_unit(4, DIM, g=g) for _ in range(4)]
    loss_fn(*first[:4], torch.tensor(5.0))  # fills the queue with ids -1
    s_img, s_txt, m_img, m_txt = (_unit(4, DIM, g=g) for _ in range(4))
    got = loss_fn(s_img, s_txt, m_img, m_txt, torch.tensor(5.0), None, 0.3)
    # distinct ids for the batch, ids no batch row has for the queue: the same thing written with ids
    queue = (first[2], first[3], torch.full((4,), -1))
    expected = _reference(s_img, s_txt, m_img, m_txt, 5.0, torch.arange(4), queue, 0.3, True)
    torch.testing.assert_close(got, expected)


def test_queues_are_fifo_and_filled_only_in_training() -> None:
    loss_fn = MomentumContrastiveLoss(2, 5)
    seen_img, seen_txt, seen_ids = [], [], []
    for step in range(4):
        m_img = torch.tensor([[1.0, step], [2.0, step]])
        m_txt = torch.tensor([[3.0, step], [4.0, step]])
        ids = torch.tensor([10 * step, 10 * step + 1])
        loss_fn(F.normalize(m_img, dim=-1), F.normalize(m_txt, dim=-1), m_img, m_txt, torch.tensor(1.0), ids)
        seen_img += list(F.normalize(m_img, dim=-1))
        seen_txt += list(F.normalize(m_txt, dim=-1))
        seen_ids += ids.tolist()
    img, ids = loss_fn.image_queue.valid()
    txt, txt_ids = loss_fn.text_queue.valid()
    torch.testing.assert_close(img, torch.stack(seen_img[-5:]))  # the 5 newest, oldest first
    torch.testing.assert_close(txt, torch.stack(seen_txt[-5:]))
    assert ids.tolist() == txt_ids.tolist() == seen_ids[-5:] == [11, 20, 21, 30, 31]
    loss_fn.eval()
    loss_fn(*(torch.ones(2, 2),) * 4, torch.tensor(1.0), torch.tensor([7, 8]))
    assert loss_fn.image_queue.valid()[1].tolist() == [11, 20, 21, 30, 31]


# ------------------------------------------------------------------------ the task's momentum model


def _task_config(text_model_dir: Path, teacher_checkpoint: Path, **loss: Any) -> Config:
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [{"type": "karpathy", "path": "x.json", "images": "."}])
    raw["loss"].update(kd="none", **loss)
    raw["teacher"]["enabled"] = False
    raw["model"]["image"]["freeze_layers"] = 1  # frozen parts must stay equal in the copy
    return Config.model_validate(raw)


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "input_ids": torch.randint(5, 30, (n, 10), generator=g),
            "attention_mask": torch.ones(n, 10, dtype=torch.int64), "image_id": torch.tensor([0, 1, 1, 2])[:n]}


def test_default_config_has_no_momentum_model(text_model_dir, teacher_checkpoint) -> None:
    from unialign.training.module import SMKETraining

    assert not LossConfig().uses_momentum_model
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [{"type": "karpathy", "path": "x.json", "images": "."}])
    module = SMKETraining(raw)
    assert module.task.momentum_model is None and module.task.itc_momentum is None
    assert not any(k.startswith(("momentum_model.", "itc_momentum.")) for k in module.state_dict())


def test_momentum_model_starts_equal_and_follows_the_ema_rule(text_model_dir, teacher_checkpoint) -> None:
    from unialign.training.task import DistillTask

    torch.manual_seed(0)
    task = DistillTask.from_config(_task_config(text_model_dir, teacher_checkpoint, queue_size=8, momentum=0.9))
    student, twin = dict(task.model.named_parameters()), dict(task.momentum_model.named_parameters())
    assert student.keys() == twin.keys()
    assert all(torch.equal(student[k], twin[k]) and not twin[k].requires_grad for k in student)
    assert not task.momentum_model.training
    before = {k: v.clone() for k, v in twin.items()}
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(torch.randn_like(p))  # also the frozen ones, which the copy must not follow
    task.after_optimizer_step()
    frozen = {k for k, p in student.items() if not p.requires_grad}
    assert frozen and len(frozen) < len(student)
    for k, p in student.items():
        expected = before[k] if k in frozen else 0.9 * before[k] + 0.1 * p
        torch.testing.assert_close(twin[k], expected, msg=k)
    task.train()  # as Lightning does: the momentum model runs without dropout all the same
    out = task(_batch())
    assert not task.momentum_model.training and len(task.itc_momentum.image_queue) == 4
    out["loss"].backward()
    assert all(p.grad is None for p in task.momentum_model.parameters())


def test_mod_alpha_ramps_over_the_first_epoch(text_model_dir, teacher_checkpoint) -> None:
    from unialign.training.task import DistillTask

    task = DistillTask.from_config(_task_config(text_model_dir, teacher_checkpoint, mod_alpha=0.4))
    assert task.itc_momentum.image_queue.size == 0  # MoD without queues
    task.steps_per_epoch = 4
    alphas = []
    for _ in range(6):
        alphas.append(task.mod_alpha())
        task.after_optimizer_step()
    assert alphas == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    task.steps_per_epoch = None
    assert task.mod_alpha() == 0.4


@pytest.mark.parametrize("loss,message", [
    ({"momentum": 1.0}, "0 < momentum < 1"), ({"momentum": 0.0}, "0 < momentum < 1"),
    ({"queue_size": -1}, "queue_size needs to be >= 0"), ({"mod_alpha": 1.5}, "0 <= mod_alpha <= 1"),
    ({"mod_alpha": -0.1}, "0 <= mod_alpha <= 1"),
])
def test_config_ranges_are_checked(loss: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossConfig(**loss)


# ------------------------------------------------------------------------------- two ranks (gloo)


def _dist_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"feats": _unit(STEPS, 4, BATCH, DIM, g=g),  # student image, text; momentum image, text
            "ids": torch.tensor([[0, 1, 2, 1, 3, 0], [4, 2, 5, 0, 6, 7], [1, 8, 4, 9, 2, 10]])}


def _dist_run(data: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, Any]:
    local = BATCH // world
    sl = slice(rank * local, (rank + 1) * local)
    out: dict[str, Any] = {}
    for name, queue, alpha in (("queue", QUEUE, 0.0), ("queue_mod", QUEUE, 0.4), ("mod", 0, 0.4)):
        for use_ids in (False, True):
            loss_fn = MomentumContrastiveLoss(DIM, queue)
            for step in range(STEPS):
                s_img, s_txt, m_img, m_txt = (x[sl].clone() for x in data["feats"][step])
                s_img.requires_grad_()
                s_txt.requires_grad_()
                scale = torch.tensor(9.0, requires_grad=True)
                ids = data["ids"][step, sl] if use_ids else None
                loss = loss_fn(s_img, s_txt, m_img, m_txt, scale, ids, alpha)
                loss.backward()
                out[f"{name}{use_ids}{step}"] = (loss.detach(), s_img.grad, s_txt.grad, scale.grad)
            out[f"{name}{use_ids}queues"] = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    return out


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_dist_run(torch.load(f"{tmp}/inputs.pt"), rank, world), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    """Loss = mean of the ranks' losses; local gradients = world_size x the big-batch ones (DDP
    averages parameter gradients: see tests/test_losses_distributed.py); queues identical."""
    data = _dist_inputs()
    torch.save(data, tmp_path / "inputs.pt")
    mp.spawn(_worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _dist_run(data, 0, 1)
    for key, value in single.items():
        if key.endswith("queues"):
            assert int(value["image_queue.count"]) == (QUEUE if not key.startswith("mod") else 0)
            for r in ranks:
                assert r[key].keys() == value.keys()
                for name in value:
                    assert torch.equal(r[key][name], value[name]), (key, name)
            continue
        loss, g_img, g_txt, g_scale = value
        torch.testing.assert_close(torch.stack([r[key][0] for r in ranks]).mean(), loss, msg=key)
        torch.testing.assert_close(torch.cat([r[key][1] for r in ranks]) / WORLD, g_img, msg=key)
        torch.testing.assert_close(torch.cat([r[key][2] for r in ranks]) / WORLD, g_txt, msg=key)
        torch.testing.assert_close(torch.stack([r[key][3] for r in ranks]).mean(), g_scale, msg=key)


# ------------------------------------------------------------------------ training runs: resume, export


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unialign.data.synthetic import make_synthetic_karpathy

    root = tmp_path_factory.mktemp("world")
    make_synthetic_karpathy(root, n_images=16, captions_per_image=2, image_size=32, seed=0)
    return root


def test_resume_with_momentum_matches_uninterrupted_run_and_export_has_no_momentum(
        small_world, text_model_dir, teacher_checkpoint, tmp_path) -> None:
    from lightning.pytorch.callbacks import Callback

    import unialign
    from unialign.training.trainer import CHECKPOINT_DIR, FINAL, LAST, train

    class Losses(Callback):
        def __init__(self) -> None:
            self.losses: dict[int, float] = {}
            self.alphas: dict[int, float] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.alphas[trainer.global_step] = pl_module.task.mod_alpha()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses[trainer.global_step] = float(outputs["loss"])

    class Crash(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 3:
                raise RuntimeError("simulated crash")

    src = {"type": "karpathy", "path": str(small_world / "dataset_synthetic.json"), "images": str(small_world)}
    # 32 pairs / 8 = 4 steps an epoch: the checkpoint at step 2 falls mid-way through MoD's ramp,
    # and the 12-entry queues wrap around before it. (No KD: the tests of the KD bank cover it.)
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [src], epochs=2, checkpoint_every_steps=2)
    raw["loss"].update(queue_size=12, mod_alpha=0.4, momentum=0.9, kd="none")
    raw["teacher"]["enabled"] = False
    cfg = parse_config(raw)
    full = Losses()
    train(cfg, tmp_path / "full", callbacks=[full])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, tmp_path / "part", callbacks=[Crash()])
    resumed = Losses()
    train(cfg, tmp_path / "part", resume=True, callbacks=[resumed])
    assert min(resumed.losses) == 3 and max(resumed.losses) == 8
    # MoD's weight ramps over the first epoch (4 optimizer steps), also across the resume
    assert [full.alphas[s] for s in range(8)] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4])
    assert all(alpha == pytest.approx(full.alphas[s]) for s, alpha in resumed.alphas.items())
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], rel=1e-5, abs=1e-6), step

    a = torch.load(tmp_path / "full" / CHECKPOINT_DIR / LAST, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / CHECKPOINT_DIR / LAST, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert any(k.startswith("momentum_model.") for k in a) and int(a["itc_momentum.image_queue.count"]) == 12
    assert int(a["itc_momentum.step"]) == 8
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-5), name
    # The momentum model moved away from its start and stays distinct from the student.
    assert not torch.equal(a["momentum_model.shared.0.attn.qkv.weight"], a["model.shared.0.attn.qkv.weight"])

    final_path = tmp_path / "full" / CHECKPOINT_DIR / FINAL
    final = torch.load(final_path, weights_only=True)["state_dict"]
    assert not any(k.startswith(("momentum_model.", "itc_momentum.")) for k in final)
    model, _, _ = unialign.load(final_path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, a[f"model.{name}"]), name
