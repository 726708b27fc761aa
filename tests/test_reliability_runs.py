"""Reliability of runs and evaluations (issue 13): finished runs are not trained over, a run leaves
one set of checkpoints, a few bad samples do not stop a good run, a gallery with missing images
is not scored silently, damaged checkpoints and full disks are reported in one line."""

from __future__ import annotations

import argparse
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from test_training import Crash, _config, world  # noqa: F401  (world: the same module-scoped fixture)
from unialign.config import parse_config
from unialign.files import WriteError, atomic_path, write_json_atomic
from unialign.model.factory import CheckpointError, read_checkpoint
from unialign.training.callbacks import BadDataError, BadSamples, bad_fraction_lower_bound
from unialign.training.module import SMKETraining
from unialign.training.trainer import CHECKPOINT_DIR, FINAL, LAST, SUMMARY, AtomicCheckpointIO, run_files, train


def _checkpoint_files(run: Path) -> set[str]:
    return {p.name for p in (run / CHECKPOINT_DIR).iterdir()}


# ------------------------------------------------------------------ 1, 2: finished runs, one set of files


def test_short_run_leaves_one_last_checkpoint_and_is_never_trained_over(world, text_model_dir,
                                                                         teacher_checkpoint, tmp_path):
    cfg = parse_config(_config(world, text_model_dir, teacher_checkpoint, max_steps=2))
    run = tmp_path / "run"
    train(cfg, run)
    # Shorter than checkpoint_every_steps: Lightning's own end-of-training save used to add last-v1.ckpt.
    assert _checkpoint_files(run) == {LAST, FINAL}

    # The state the demo leaves, or a user who deleted last.ckpt: still a finished run.
    (run / CHECKPOINT_DIR / LAST).unlink()
    with pytest.raises(FileExistsError) as exc:
        train(cfg, run)
    message = str(exc.value)
    assert "\n" not in message and str(run) in message and FINAL in message and SUMMARY in message
    assert "pass --resume" in message
    (run / CHECKPOINT_DIR / FINAL).unlink()
    with pytest.raises(FileExistsError, match=r"already holds a run \(summary\.json\)"):
        train(cfg, run)
    assert json.loads((run / SUMMARY).read_text())["global_step"] == 2  # untouched


def test_run_files_lists_what_makes_a_run(tmp_path):
    assert run_files(tmp_path / "absent") == []
    (tmp_path / CHECKPOINT_DIR).mkdir()
    (tmp_path / "config.yaml").write_text("seed: 0\n")  # a run that died before its first checkpoint
    (tmp_path / CHECKPOINT_DIR / ".last.ckpt.x1.tmp").write_bytes(b"half")
    assert run_files(tmp_path) == []
    (tmp_path / CHECKPOINT_DIR / "step00000010.ckpt").write_bytes(b"x")
    assert run_files(tmp_path) == [f"{CHECKPOINT_DIR}/step00000010.ckpt"]


def test_periodic_and_resumed_runs_leave_no_versioned_or_temporary_files(world, text_model_dir,
                                                                          teacher_checkpoint, tmp_path):
    cfg = parse_config(_config(world, text_model_dir, teacher_checkpoint, max_steps=5, checkpoint_every_steps=2))
    full = tmp_path / "full"
    train(cfg, full)
    assert _checkpoint_files(full) == {"step00000004.ckpt", LAST, FINAL}

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, crashed, callbacks=[Crash(at_step=3)])
    assert _checkpoint_files(crashed) == {"step00000002.ckpt", LAST}
    # Moved (Lightning then no longer knows last.ckpt as its own) and a write killed midway.
    moved = tmp_path / "moved"
    shutil.move(crashed, moved)
    stale = moved / CHECKPOINT_DIR / ".last.ckpt.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 1000)
    summary = train(cfg, moved, resume=True)
    assert summary["global_step"] == 5
    assert _checkpoint_files(moved) == {"step00000004.ckpt", LAST, FINAL}, "no last-v1.ckpt, no stale .tmp"


# ------------------------------------------------------------------ 3: bad-sample guard


def _guard(max_bad_fraction: float) -> BadSamples:
    """The training run's bad-sample callback, used without a trainer."""
    return BadSamples(max_bad_fraction)


def _feed(guard, batches: list[tuple[int, int]]) -> int:
    """Feed (good, bad) batches; the number of batches taken before the guard stopped (or all)."""
    for i, (good, bad) in enumerate(batches):
        try:
            guard.update({"size": good, "n_skipped": bad})
        except BadDataError:
            return i
    return len(batches)


def test_a_few_bad_samples_early_do_not_stop_good_data():
    # 3 unreadable among the first 256 of a 99.9%-good data set (the report), then 0.1% bad.
    batches = [(253, 3)] + [(255, 1) if i % 4 == 0 else (256, 0) for i in range(1, 400)]
    assert _feed(_guard(0.01), batches) == len(batches)
    # Small batches, the bad samples spread over the first 256.
    batches = [(31, 1), (32, 0), (31, 1), (32, 0), (31, 1)] + [(32, 0)] * 200
    assert _feed(_guard(0.01), batches) == len(batches)


def test_mostly_bad_data_still_stops_in_the_first_batches():
    assert _feed(_guard(0.01), [(3, 5)] * 10) == 0  # 5 of 8 bad: stopped at the first batch
    assert _feed(_guard(0.05), [(4, 4)] * 10) <= 1
    assert _feed(_guard(0.2), [(128, 128)] * 10) == 0
    assert _feed(_guard(0.0), [(8, 0), (7, 1)]) == 1  # 0 means none allowed
    # Just above the limit stops once the evidence is there (2% bad at a 1% limit, batches of 256).
    stopped = _feed(_guard(0.01), [(251, 5)] * 200)
    assert 5 < stopped < 200
    with pytest.raises(BadDataError, match=r"5 of 8 training samples were unreadable .* confidence .* "
                                           r"data.max_bad_fraction=0.01"):
        _guard(0.01).update({"size": 3, "n_skipped": 5})


def test_bad_fraction_lower_bound():
    assert bad_fraction_lower_bound(0, 100) == 0.0 and bad_fraction_lower_bound(0, 0) == 0.0
    assert 0 < bad_fraction_lower_bound(1, 10_000) < 1e-4
    for bad, seen in [(3, 256), (5, 8), (1000, 100_000)]:
        assert bad_fraction_lower_bound(bad, seen) < bad / seen
    assert bad_fraction_lower_bound(1000, 100_000) > 0.008  # closes in on the fraction (1%)


def test_one_bad_image_at_the_default_limit_does_not_stop_training(world, text_model_dir, teacher_checkpoint,
                                                                   tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    data = json.loads((copy / "dataset_synthetic.json").read_text())
    first = next(e for e in data["images"] if e["split"] == "train")
    (copy / first["filepath"] / first["filename"]).write_bytes(b"not a png")
    raw = _config(copy, text_model_dir, teacher_checkpoint, batch_size=32)  # 2 of 256 samples (0.8%) bad
    summary = train(parse_config(raw), tmp_path / "run")
    assert summary["samples_bad"] == 2 and summary["samples_seen"] == 256


# ------------------------------------------------------------------ 4: eval with missing images


def _eval_cli(argv: list[str]) -> None:
    from unialign.evaluation.cli import register_retrieval

    parser = argparse.ArgumentParser(prog="unialign")
    eval_sub = parser.add_subparsers(dest="command").add_parser("eval").add_subparsers(dest="task")
    register_retrieval(eval_sub)
    args = parser.parse_args(argv)
    args.func(args)


@pytest.fixture()
def gallery(tmp_path: Path) -> Path:
    images = []
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 255 - 60 * i, 0)).save(tmp_path / f"{i}.png")
        images.append({"split": "test", "filepath": "", "filename": f"{i}.png",
                       "sentences": [{"raw": f"square {i}"}, {"raw": "a square"}]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    return path


def test_eval_refuses_a_gallery_with_missing_images(gallery, tiny_checkpoint, tmp_path, capsys):
    (gallery.parent / "1.png").unlink()
    (gallery.parent / "3.png").write_bytes(b"")  # unreadable
    out = tmp_path / "r.json"
    argv = ["eval", "retrieval", "--checkpoint", str(tiny_checkpoint), "--karpathy", str(gallery), "--images",
            str(gallery.parent), "--output", str(out), "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        _eval_cli(argv)
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "2 of 4 images" in err and "1.png" in err and "--max-missing-fraction=0.01" in err

    _eval_cli(argv + ["--max-missing-fraction", "0.5"])
    result = json.loads(out.read_text())
    assert (result["n_images"], result["n_captions"]) == (2, 4)
    assert (result["images_missing"], result["captions_missing"]) == (2, 4)
    assert "2 image(s) and 4 caption(s) missing" in capsys.readouterr().out


def test_eval_of_a_complete_gallery_reports_nothing_missing(gallery, tiny_checkpoint):
    from unialign.evaluation.run import evaluate_retrieval

    result = evaluate_retrieval(tiny_checkpoint, gallery, gallery.parent, progress=False)
    assert (result["n_images"], result["n_captions"], result["images_missing"], result["captions_missing"]) == (
        4, 8, 0, 0)


# ------------------------------------------------------------------ 5: damaged checkpoints, full disks


def _damaged(tiny_checkpoint: Path, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = tiny_checkpoint.read_bytes()
    files = {"truncated": data[: len(data) // 2], "empty": b"", "text file": b"hello, this is not a model\n",
             "legacy pickle": b"\x80\x02garbage"}
    paths = {}
    for cause, content in files.items():
        paths[cause] = folder / f"{cause.replace(' ', '_')}.ckpt"
        paths[cause].write_bytes(content)
    return paths


def test_damaged_checkpoints_give_one_line_naming_file_and_cause(tiny_checkpoint, tmp_path):
    paths = _damaged(tiny_checkpoint, tmp_path)
    expected = {"truncated": "truncated", "empty": "empty", "text file": "text file",
                "legacy pickle": "damaged or not a PyTorch checkpoint"}
    for cause, path in paths.items():
        with pytest.raises(CheckpointError) as exc:
            read_checkpoint(path)
        message = str(exc.value)
        assert "\n" not in message and str(path) in message and expected[cause] in message, message
        assert exc.value.__cause__ is None and (exc.value.__context__ is None or exc.value.__suppress_context__)
        with pytest.raises(CheckpointError, match=expected[cause]):  # what Lightning's resume reads with
            AtomicCheckpointIO().load_checkpoint(path)


def test_eval_with_a_damaged_checkpoint_exits_with_one_line(gallery, tiny_checkpoint, tmp_path, capsys):
    path = _damaged(tiny_checkpoint, tmp_path / "bad")["truncated"]
    with pytest.raises(SystemExit) as exc:
        _eval_cli(["eval", "retrieval", "--checkpoint", str(path), "--karpathy", str(gallery), "--images",
                   str(gallery.parent), "--output", str(tmp_path / "r.json"), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "truncated" in err, err


def test_resume_from_a_damaged_checkpoint_is_refused_in_one_line(world, text_model_dir, teacher_checkpoint,
                                                                 tmp_path):
    cfg = parse_config(_config(world, text_model_dir, teacher_checkpoint, max_steps=2))
    last = tmp_path / "run" / CHECKPOINT_DIR / LAST
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    with pytest.raises(CheckpointError) as exc:
        train(cfg, tmp_path / "run", resume=True)
    assert "\n" not in str(exc.value) and str(last) in str(exc.value) and "empty" in str(exc.value)


def test_disk_full_while_writing_a_checkpoint_names_the_file(world, text_model_dir, teacher_checkpoint, tmp_path,
                                                             monkeypatch):
    import unialign.files as files_module
    from unialign.model.factory import create_tokenizer, export_checkpoint

    cfg = parse_config(_config(world, text_model_dir, teacher_checkpoint, max_steps=2))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteError) as exc:
        train(cfg, tmp_path / "run")
    message = str(exc.value)
    assert exc.value.errno == errno.ENOSPC and "\n" not in message
    assert str(tmp_path / "run" / CHECKPOINT_DIR / LAST) in message and "no space left on device" in message
    assert not [p for p in (tmp_path / "run" / CHECKPOINT_DIR).iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()

    # A real full device (/dev/full): torch's own writer would report "unexpected pos ..." instead.
    # The training checkpoints and the inference export (`export_checkpoint`) write the same way.
    real_open = open
    monkeypatch.setattr(files_module, "open", lambda path, mode="r", *a, **k: real_open("/dev/full", mode),
                        raising=False)
    with pytest.raises(WriteError, match=r"cannot write .*ckpt: no space left on device"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(100_000)}, tmp_path / "x" / "step.ckpt")
    assert list((tmp_path / "x").iterdir()) == []
    model = SMKETraining(cfg.model_dump(mode="json"), tokenizer=create_tokenizer(cfg)).model
    with pytest.raises(WriteError, match=r"cannot write .*model\.pt: no space left on device"):
        export_checkpoint(model, cfg, create_tokenizer(cfg), tmp_path / "y" / "model.pt")
    assert list((tmp_path / "y").iterdir()) == []


@pytest.mark.parametrize(("code", "cause"), [(errno.EACCES, "permission denied"),
                                             (errno.EROFS, "read-only file system"),
                                             (errno.ENOSPC, "no space left on device")])
def test_storage_errors_of_atomic_writes_are_one_line(tmp_path, monkeypatch, code, cause):
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(code, "refused")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # a read-only or forbidden folder
    with pytest.raises(WriteError, match=rf"cannot write .*summary\.json: {cause}"):
        write_json_atomic(tmp_path / "summary.json", {})
    monkeypatch.undo()
    with pytest.raises(WriteError, match=rf"cannot write .*a\.bin: {cause}"):
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
            raise OSError(code, "refused")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError) as other:  # other errors are left as they are
        with atomic_path(tmp_path / "b.bin"):
            raise OSError(errno.EIO, "I/O error")
    assert not isinstance(other.value, WriteError)
