"""FSDP (``train.strategy: fsdp``) shards the training module the way the trainer configures it.

Lightning runs FSDP on GPUs only, so this drives torch's FSDP directly with the trainer's own
options (``fsdp_options``), on 2 CPU ranks over gloo: the sharded step must give the loss and the
full gradients of one process on the whole batch (each rank computes on its half; FSDP averages
gradients over ranks, the losses are written so that this average is the big-batch gradient).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import tiny_config_dict
from unialign.config import parse_config
from unialign.data import make_synthetic_karpathy
from unialign.model.factory import create_tokenizer
from unialign.training.datamodule import RetrievalDataModule
from unialign.training.module import SMKETraining

WORLD = 2
BATCH = 8


class _Step(nn.Module):
    """The loss as ``forward``, as Lightning redirects FSDP's forward to ``training_step``."""

    def __init__(self, module: SMKETraining) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.module.task(batch)["loss"]


def _module(raw: dict) -> SMKETraining:
    torch.manual_seed(0)
    module = SMKETraining(parse_config(raw).model_dump(mode="json"))
    module.train()
    module.model.eval()  # no dropout: the ranks' masks could not match the single process's
    return module


def _shard(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    n = batch["image"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n] if isinstance(v, torch.Tensor) and v.ndim else v for k, v in batch.items()}


def _worker(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from unialign.training.trainer import fsdp_options

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        raw, batches = torch.load(f"{tmp}/inputs.pt", weights_only=False)
        options = fsdp_options()
        options["auto_wrap_policy"] = ModuleWrapPolicy(options["auto_wrap_policy"])
        model = FSDP(_Step(_module(raw)), device_id=torch.device("cpu"), **options)
        decay = model.module.module.weight_decay_split()  # what configure_optimizers sees after wrapping
        shard_shapes = {p.ndim for p in model.parameters()}
        losses = []
        for batch in batches:  # two steps: the second sees the KD bank filled by the first
            model.zero_grad()
            loss = model(_shard(batch, rank, world))
            loss.backward()
            losses.append(loss.detach())
        units = sum(isinstance(m, FSDP) for m in model.modules())
        with FSDP.summon_full_params(model, with_grads=True):
            grads = {name.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                     for name, p in model.named_parameters() if p.grad is not None}
        torch.save({"losses": losses, "grads": grads, "units": units, "decay": decay, "shard_shapes": shard_shapes},
                   f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def raw(tmp_path_factory, text_model_dir, teacher_checkpoint) -> dict:
    root = tmp_path_factory.mktemp("fsdp_world")
    make_synthetic_karpathy(root, n_images=16, captions_per_image=1, image_size=32, seed=2,
                            split_counts={"train": 16, "val": 0})
    src = {"type": "karpathy", "path": str(root / "dataset_synthetic.json"), "images": str(root),
           "splits": ["train"]}
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [src], batch_size=BATCH)
    raw["loss"]["bank_size"] = 12
    return raw


def test_fsdp_step_matches_single_process(raw, tmp_path) -> None:
    cfg = parse_config(raw)
    dm = RetrievalDataModule(cfg.data, create_tokenizer(cfg), cfg.model.text.max_length, BATCH, cfg.seed)
    it = iter(dm.train_dataloader())
    batches = [dm.on_after_batch_transfer(next(it), 0) for _ in range(2)]
    torch.save((raw, batches), tmp_path / "inputs.pt")
    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(_worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    single = _Step(_module(raw))
    for step, batch in enumerate(batches):
        single.zero_grad()
        loss = single(batch)
        loss.backward()
        # each rank's loss is the mean over its rows: their mean is the whole batch's loss
        torch.testing.assert_close(torch.stack([r["losses"][step] for r in ranks]).mean(), loss.detach(),
                                   rtol=1e-5, atol=1e-6)
    expected = {f"module.{name}": p.grad for name, p in single.module.named_parameters() if p.grad is not None}
    # a unit per block: 2 image + 2 text (towers cut to 2), 1 shared, 4 teacher (full), plus the root
    assert ranks[0]["units"] == 2 + 2 + 1 + 4 + 1
    # Weight decay as without FSDP, although every wrapped parameter now shows as a 1-d shard.
    assert ranks[0]["shard_shapes"] == {1} and ranks[0]["decay"] == single.module.weight_decay_split()
    assert 0 < sum(ranks[0]["decay"].values()) < len(ranks[0]["decay"])
    frozen = {f"module.{name}" for name, p in single.module.named_parameters() if not p.requires_grad}
    for r in ranks:
        assert set(expected) <= set(r["grads"])  # every trained part has its gradient ...
        extra = set(r["grads"]) - set(expected)  # ... and the frozen teacher's share of the root unit
        assert extra <= frozen and all(not r["grads"][name].any() for name in extra), sorted(extra)  # only zeros
        for name, grad in expected.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
