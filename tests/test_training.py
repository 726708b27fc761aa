"""End-to-end training on generated data: learning, teacher frozen, resume, bad data, CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import tiny_config_dict
from unialign.config import parse_config
from unialign.data.synthetic import make_synthetic_karpathy
from unialign.model.smke import NO_DECAY_NAMES
from unialign.training.callbacks import BadDataError
from unialign.training.trainer import CHECKPOINT_DIR, FINAL, LAST, train


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    make_synthetic_karpathy(root, n_images=160, captions_per_image=2, image_size=32, seed=0,
                            split_counts={"train": 128, "val": 16, "test": 16})
    return root


def _config(world: Path, text_model_dir: Path, teacher_checkpoint: Path, splits=("train",), **train):
    src = {"type": "karpathy", "path": str(world / "dataset_synthetic.json"), "images": str(world),
           "splits": list(splits)}
    return tiny_config_dict(text_model_dir, teacher_checkpoint, [src], **train)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.itc: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.itc[trainer.global_step] = float(trainer.callback_metrics["train/itc"])


class Crash(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def test_training_learns_and_keeps_teacher_frozen(world, text_model_dir, teacher_checkpoint, tmp_path):
    raw = _config(world, text_model_dir, teacher_checkpoint, epochs=6, base_lr=3e-3, scale_lr=False,
                  warmup_fraction=0.05)
    # Retrieval over the 128 training images: chance is R@1 0.8%, R@5 3.9%, R@10 7.8% (mean ~4.2%).
    # With BERT's dropout on, seeds 0-4 reached a mean of 7.9, 10.4, 12.7, 15.3 and 11.1: demand 1.5x chance.
    raw["data"]["val"] = {"type": "karpathy", "path": str(world / "dataset_synthetic.json"), "images": str(world)}
    raw["data"]["val_split"] = "train"
    cfg = parse_config(raw)
    recorder = LossRecorder()
    before = torch.load(teacher_checkpoint)
    summary = train(cfg, tmp_path / "run", callbacks=[recorder])
    steps = sorted(recorder.losses)
    assert len(steps) == 6 * (256 // 8)
    # The contrastive loss falls (the KD loss first rises as the memory bank fills with negatives).
    first = sum(recorder.itc[s] for s in steps[:8]) / 8
    last = sum(recorder.itc[s] for s in steps[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    assert summary["metrics"]["val/r_mean"] > 6.3, summary["metrics"]
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT_DIR / LAST, weights_only=False)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert not any("teacher" in str(group) for group in ckpt["optimizer_states"][0]["param_groups"][0])
    # The teacher used in training equals the checkpoint file, untouched.
    from unialign.training.module import SMKETraining

    module = SMKETraining(cfg.model_dump(mode="json"))
    module.load_state_dict(ckpt["state_dict"], strict=False)
    teacher_state = module.teacher.backbone.model.state_dict()
    for name, value in before.items():
        if name in teacher_state:
            assert torch.equal(teacher_state[name], value), name
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "summary.json").is_file()


class ModeProbe(Callback):
    """Records, before each step, whether the student's dropout layers and the teacher train."""

    def __init__(self) -> None:
        self.modes: list[tuple[bool, int, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        dropouts = [m for m in pl_module.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        self.modes.append((all(m.training for m in dropouts), len(dropouts),
                           any(m.training for m in pl_module.teacher.modules())))


def test_student_trains_with_dropout_teacher_stays_eval(world, text_model_dir, teacher_checkpoint, tmp_path):
    # transformers loads the text tower in eval mode; training must switch it (BERT dropout 0.1),
    # also after a validation pass, and must never switch the teacher.
    raw = _config(world, text_model_dir, teacher_checkpoint, max_steps=6, val_every_steps=2)
    raw["data"]["val"] = {"type": "karpathy", "path": str(world / "dataset_synthetic.json"), "images": str(world)}
    probe = ModeProbe()
    train(parse_config(raw), tmp_path / "run", callbacks=[probe])
    assert len(probe.modes) == 6
    assert all(student and n_dropout > 0 and not teacher for student, n_dropout, teacher in probe.modes), probe.modes


def test_resume_matches_uninterrupted_run(world, text_model_dir, teacher_checkpoint, tmp_path):
    cfg = parse_config(_config(world, text_model_dir, teacher_checkpoint, epochs=2, checkpoint_every_steps=5))
    full = LossRecorder()
    train(cfg, tmp_path / "full", callbacks=[full])

    crashed = LossRecorder()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, tmp_path / "resumed", callbacks=[crashed, Crash(at_step=43)])  # mid-way through epoch 2
    resumed = LossRecorder()
    train(cfg, tmp_path / "resumed", resume=True, callbacks=[resumed])
    assert min(resumed.losses) == 41  # restarted right after the step-40 checkpoint
    assert sorted(full.losses) == sorted({**crashed.losses, **resumed.losses})
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], rel=1e-5, abs=1e-6), step
    a = torch.load(tmp_path / "full" / CHECKPOINT_DIR / FINAL, weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "resumed" / CHECKPOINT_DIR / FINAL, weights_only=False)["state_dict"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_fsdp_without_a_gpu_is_refused_before_any_work(world, text_model_dir, teacher_checkpoint, tmp_path):
    from unialign.config import ConfigError

    cfg = parse_config(_config(world, text_model_dir, teacher_checkpoint, strategy="fsdp", accelerator="auto"))
    with pytest.raises(ConfigError, match="fsdp needs a GPU"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_output_dir_with_a_run_needs_resume(world, text_model_dir, teacher_checkpoint, tmp_path):
    cfg = parse_config(_config(world, text_model_dir, teacher_checkpoint, max_steps=2))
    with pytest.raises(FileNotFoundError, match="--resume given but"):
        train(cfg, tmp_path / "run", resume=True)
    train(cfg, tmp_path / "run")
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(cfg, tmp_path / "run")


def test_resume_takes_the_newest_checkpoint(tmp_path):
    """A run killed between the periodic step checkpoint and last.ckpt (seconds apart for a large
    model; it happened to the FSDP run on an H100) resumes from the step checkpoint."""
    import os

    from unialign.training.trainer import resume_checkpoint

    ckpts = tmp_path / CHECKPOINT_DIR
    ckpts.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        resume_checkpoint(tmp_path)
    for name, age in [("step00000100.ckpt", 30), ("last.ckpt", 20), (FINAL, 0)]:
        (ckpts / name).write_bytes(b"x")
        os.utime(ckpts / name, (1e9 - age, 1e9 - age))
    assert resume_checkpoint(tmp_path).name == "last.ckpt"  # the usual case; final.ckpt holds weights only
    (ckpts / "step00000200.ckpt").write_bytes(b"x")  # written, then killed before last.ckpt
    assert resume_checkpoint(tmp_path).name == "step00000200.ckpt"
    (ckpts / "last.ckpt").unlink()
    (ckpts / "step00000200.ckpt").unlink()
    assert resume_checkpoint(tmp_path).name == "step00000100.ckpt"


def _corrupt(world: Path, tmp_path: Path, n_bad: int) -> Path:
    """A copy of the world with `n_bad` train images replaced by garbage bytes."""
    import shutil

    copy = tmp_path / "corrupt_world"
    shutil.copytree(world, copy)
    data = json.loads((copy / "dataset_synthetic.json").read_text())
    train_entries = [e for e in data["images"] if e["split"] == "train"]
    for entry in train_entries[:n_bad]:
        (copy / entry["filepath"] / entry["filename"]).write_bytes(b"not a png at all")
    return copy


def test_corrupt_images_are_skipped_and_counted(world, text_model_dir, teacher_checkpoint, tmp_path):
    copy = _corrupt(world, tmp_path, n_bad=2)
    raw = _config(copy, text_model_dir, teacher_checkpoint)
    raw["data"]["max_bad_fraction"] = 0.05
    summary = train(parse_config(raw), tmp_path / "run")
    assert summary["samples_bad"] == 4  # 2 images x 2 captions each
    assert summary["samples_seen"] == 256
    listed = (tmp_path / "run" / "bad_samples.rank0.tsv").read_text().splitlines()
    assert len(listed) == 4 and all("000000.png" in line or "000001.png" in line for line in listed)


def test_too_much_bad_data_stops_with_a_clear_error(world, text_model_dir, teacher_checkpoint, tmp_path):
    copy = _corrupt(world, tmp_path, n_bad=40)
    raw = _config(copy, text_model_dir, teacher_checkpoint)
    raw["data"]["max_bad_fraction"] = 0.05
    with pytest.raises(BadDataError, match=r"training samples were unreadable .* data.max_bad_fraction=0.05"):
        train(parse_config(raw), tmp_path / "run")


def test_optimizer_groups_and_lr_scaling(world, text_model_dir, teacher_checkpoint, tmp_path):
    cfg = parse_config(_config(world, text_model_dir, teacher_checkpoint, max_steps=1, base_lr=1e-4,
                               batch_size=8, accumulate_grad_batches=2, warmup_fraction=0.5))
    from unialign.training.module import SMKETraining

    captured = {}

    class Grab(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            captured["opt"] = trainer.optimizers[0]
            captured["names"] = {id(p): n for n, p in pl_module.named_parameters()}

    train(cfg, tmp_path / "run", callbacks=[Grab()])
    decay, no_decay = captured["opt"].param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert decay["initial_lr"] == pytest.approx(1e-4 * 16 / 256)
    names = captured["names"]
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.logit_scale" in no_decay_names
    assert any(n.endswith("word_embeddings.weight") for n in no_decay_names)
    assert any(n.endswith("pos_embed") for n in no_decay_names)
    for p in decay["params"]:
        assert p.ndim >= 2 and not any(k in names[id(p)] for k in NO_DECAY_NAMES)
    assert not any("teacher" in names.get(id(p), "teacher") for g in (decay, no_decay) for p in g["params"])
    assert isinstance(SMKETraining, type)


def test_cli_train_eval_embed(world, text_model_dir, teacher_checkpoint, tmp_path, capsys):
    import yaml

    from unialign.cli import main

    raw = _config(world, text_model_dir, teacher_checkpoint)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    main(["train", "--config", str(config), "--set", "train.max_steps=3", "--output", str(tmp_path / "run")])
    ckpt = tmp_path / "run" / CHECKPOINT_DIR / FINAL
    out = tmp_path / "eval.json"
    main(["eval", "retrieval", "--checkpoint", str(ckpt), "--karpathy", str(world / "dataset_synthetic.json"),
          "--images", str(world), "--split", "test", "--output", str(out)])
    result = json.loads(out.read_text())
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
        assert 0.0 <= result[key] <= 100.0
    assert result["n_images"] == 16 and result["n_captions"] == 32
    assert result["r_mean"] == pytest.approx(sum(result[k] for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1",
                                                                      "img_r5", "img_r10")) / 6)
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\n\na blue square\n")
    main(["embed", "--checkpoint", str(ckpt), "--texts", str(texts), "--output", str(tmp_path / "t.npy")])
    import numpy as np

    emb = np.load(tmp_path / "t.npy")
    assert emb.shape == (2, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    main(["embed", "--checkpoint", str(ckpt), "--images", str(world / "images"), "--output",
          str(tmp_path / "i.npy")])
    assert np.load(tmp_path / "i.npy").shape == (160, 64)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(config), "--set", "train.batch_sise=3", "--output", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "train.batch_sise: Extra inputs are not permitted" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # rejected before any work


def test_init_checkpoint_starts_fine_tuning_from_trained_weights(world, text_model_dir, teacher_checkpoint,
                                                                 tmp_path):
    from unialign.model.factory import read_checkpoint, student_state_dict
    from unialign.training.module import SMKETraining

    train(parse_config(_config(world, text_model_dir, teacher_checkpoint, max_steps=2)), tmp_path / "pre")
    final = tmp_path / "pre" / CHECKPOINT_DIR / FINAL
    raw = _config(world, text_model_dir, teacher_checkpoint)
    raw["model"]["init_checkpoint"] = str(final)
    raw["loss"].update(kd="none", itc_interm=False)
    raw["teacher"]["enabled"] = False
    module = SMKETraining(parse_config(raw).model_dump(mode="json"))
    trained = student_state_dict(read_checkpoint(final))
    state = module.model.state_dict()
    assert "logit_scale_interm" in trained and "logit_scale_interm" not in state  # optional part dropped
    for name, value in state.items():
        assert torch.equal(value, trained[name]), name
    raw["model"]["shared"]["depth"] = 2  # a different architecture is refused, naming the file
    with pytest.raises(ValueError, match=r"init_checkpoint .*final\.ckpt does not match"):
        SMKETraining(parse_config(raw).model_dump(mode="json"))


def _train_cli(raw: dict, output: Path, *extra: str) -> None:
    """`unialign train` in a subprocess: with strategy ddp, Lightning starts rank 1 by re-running it."""
    import os
    import subprocess
    import sys

    import yaml

    config = output.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "unialign", "train", "--config", str(config), "--output",
                           str(output), *extra], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_two_processes_through_the_cli(world, text_model_dir, teacher_checkpoint, tmp_path):
    """The real launch path: Lightning starts rank 1 by re-running the command (gloo on CPU)."""
    src = {"type": "karpathy", "path": str(world / "dataset_synthetic.json"), "images": str(world)}
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [dict(src, splits=["train"])], dict(src),
                           max_steps=4, strategy="ddp", devices=2, val_every_steps=4)
    _train_cli(raw, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 4
    assert summary["samples_seen"] == 2 * 4 * 8  # both ranks counted
    assert 0.0 <= summary["metrics"]["val/r_mean"] <= 100.0  # validation gathered across ranks
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT_DIR / LAST, weights_only=True)
    assert int(ckpt["state_dict"]["kd.bank.count"]) == 64  # 4 steps x 16 targets gathered from both ranks
    # each rank has its own dropout stream, and the checkpoint keeps both for a resume
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])


def test_ddp_without_distillation(world, text_model_dir, teacher_checkpoint, tmp_path):
    """The no-KD baseline on 2 ranks: a model without KD has no KD head (an unused one gets no
    gradient, which DDP stops on at the second step), and its checkpoint loads for inference."""
    import unialign

    src = {"type": "karpathy", "path": str(world / "dataset_synthetic.json"), "images": str(world),
           "splits": ["train"]}
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [src], max_steps=3, strategy="ddp_spawn", devices=2)
    raw["loss"]["kd"] = "none"
    raw["teacher"]["enabled"] = False
    summary = train(parse_config(raw), tmp_path / "run")
    assert summary["global_step"] == 3 and summary["world_size"] == 2
    model, _, _ = unialign.load(tmp_path / "run" / CHECKPOINT_DIR / FINAL)
    assert model.kd_head is None and not any(k.startswith("kd") for k in model.state_dict())

def test_ddp_resume_matches_uninterrupted_run(world, text_model_dir, teacher_checkpoint, tmp_path):
    """2 ranks (ddp_fork, gloo), dropout on: a run that crashes after its step-3 checkpoint and
    resumes ends with the uninterrupted run's weights. That needs each rank's own RNG state back
    (restoring rank 0's on both ranks fails here) and both ranks' data positions; it also checks
    that the end-of-run files come from the forked workers, not the launching process (the same
    launcher as ddp_spawn, which test_ddp_without_distillation runs; forking starts faster)."""
    src = {"type": "karpathy", "path": str(world / "dataset_synthetic.json"), "images": str(world),
           "splits": ["train"]}
    cfg = parse_config(tiny_config_dict(text_model_dir, teacher_checkpoint, [src], max_steps=6,
                                        strategy="ddp_fork", devices=2, checkpoint_every_steps=3))
    full = train(cfg, tmp_path / "full")
    with pytest.raises(Exception, match="simulated crash"):
        train(cfg, tmp_path / "part", callbacks=[Crash(at_step=4)])
    resumed = train(cfg, tmp_path / "part", resume=True)
    assert full["global_step"] == resumed["global_step"] == 6 and full["world_size"] == 2
    assert full["samples_seen"] == 6 * 2 * 8
    a = torch.load(tmp_path / "full" / CHECKPOINT_DIR / FINAL, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / CHECKPOINT_DIR / FINAL, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


class PushScale(Callback):
    """Puts both ITC scale parameters past the cap before training; records them after each step."""

    def __init__(self) -> None:
        self.after: list[tuple[float, float]] = []
        self.module = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.module = pl_module
        with torch.no_grad():
            pl_module.model.logit_scale.fill_(6.0)
            pl_module.model.logit_scale_interm.fill_(-1.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = pl_module.model
        self.after.append((float(m.logit_scale), float(m.logit_scale_interm)))


def test_logit_scale_past_the_cap_is_clamped_and_can_come_back(world, text_model_dir, teacher_checkpoint, tmp_path):
    """The parameter itself is clamped after each optimiser step (the author's way): a clamp in the
    graph would leave a parameter past ln 100 with a zero gradient, stuck there for good."""
    from unialign.model.smke import LOGIT_SCALE_MAX

    push = PushScale()
    train(parse_config(_config(world, text_model_dir, teacher_checkpoint, max_steps=2)), tmp_path / "run",
          callbacks=[push])
    assert len(push.after) == 2
    for main, interm in push.after:
        assert 0 <= main <= LOGIT_SCALE_MAX + 1e-6 and 0 <= interm <= LOGIT_SCALE_MAX + 1e-6
    model = push.module.model
    with torch.no_grad():
        model.logit_scale.fill_(6.0)
    model.clamp_scales_()
    assert float(model.logit_scale) == pytest.approx(LOGIT_SCALE_MAX)
    model.zero_grad()
    model.scales()[0].sum().backward()  # a loss that wants a smaller scale
    assert float(model.logit_scale.grad) > 0  # so a step can bring it back below the cap


def test_resume_refuses_a_config_that_changes_the_run(world, text_model_dir, teacher_checkpoint, tmp_path):
    """`--set` on `--resume` must not silently rewrite the run: what it computes may not change."""
    from unialign.config import ConfigError

    raw = _config(world, text_model_dir, teacher_checkpoint, max_steps=2)
    train(parse_config(raw), tmp_path / "run")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    changed = copy.deepcopy(raw)
    changed["train"]["base_lr"] = 5e-4
    changed["model"]["shared"]["depth"] = 2
    with pytest.raises(ConfigError, match=r"train\.base_lr: 0\.0001 -> 0\.0005.*model\.shared\.depth|"
                                          r"model\.shared\.depth: 1 -> 2.*train\.base_lr"):
        train(parse_config(changed), tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved  # nothing rewritten
