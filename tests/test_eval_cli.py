"""Command-line wiring of the evaluation suite, on a parser built the way `unialign.cli` builds its own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image
from test_eval_support import solid, tiny_openclip, write_cifar, write_manifest

from unialign.evaluation.cli import register_eval, register_report, register_retrieval
from unialign.evaluation.run import evaluate_retrieval

COLOURS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0)]


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="unialign")
    sub = parser.add_subparsers(dest="command", required=True)
    eval_sub = sub.add_parser("eval").add_subparsers(dest="task", required=True)
    register_retrieval(eval_sub)
    register_eval(eval_sub)
    register_report(sub)
    args = parser.parse_args(argv)
    args.func(args)


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("karpathy")
    images = []
    for i, rgb in enumerate(COLOURS):
        Image.fromarray(solid(rgb)).save(root / f"{i}.png")
        images.append({"split": "test", "filepath": "", "filename": f"{i}.png",
                       "sentences": [{"raw": f"shape number {i}"}, {"raw": "a coloured square"}]})
    images.append({"split": "train", "filepath": "", "filename": "0.png", "sentences": [{"raw": "x"}]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    return path


def test_retrieval_checkpoint_flags_unchanged(karpathy: Path, tiny_checkpoint: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.json"
    run(["eval", "retrieval", "--checkpoint", str(tiny_checkpoint), "--karpathy", str(karpathy), "--images",
         str(karpathy.parent), "--output", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert (result["task"], result["model"], result["dataset"], result["split"]) == (
        "retrieval", str(tiny_checkpoint), "coco", "test")
    assert (result["n_images"], result["n_captions"], result["checkpoint"]) == (4, 8, str(tiny_checkpoint))
    direct = evaluate_retrieval(tiny_checkpoint, karpathy, karpathy.parent, progress=False)
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r10", "rsum"):
        assert result[key] == pytest.approx(direct[key])
    assert "| txt_r1 |" in capsys.readouterr().out


def test_retrieval_with_a_query_bank(karpathy: Path, tiny_checkpoint: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.json"
    run(["eval", "retrieval", "--checkpoint", str(tiny_checkpoint), "--karpathy", str(karpathy), "--images",
         str(karpathy.parent), "--output", str(out), "--no-progress", "--query-bank", "train"])
    result = json.loads(out.read_text())
    assert (result["query_bank"]["bank_images"], result["query_bank"]["bank_captions"]) == (1, 1)
    printed = capsys.readouterr().out
    assert "| cosine |" in printed and "| query bank (1 captions, 1 images, beta 14.3) |" in printed
    with pytest.raises(SystemExit):
        run(["eval", "retrieval", "--checkpoint", str(tiny_checkpoint), "--karpathy", str(karpathy), "--images",
             str(karpathy.parent), "--output", str(out), "--no-progress", "--query-bank", "test"])
    assert "--query-bank 'test': name the training splits" in capsys.readouterr().err


def test_retrieval_with_a_baseline_on_a_manifest(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    arch, weights = tiny_openclip(tmp_path / "oc")
    manifest = write_manifest(tmp_path / "m", [(c, [f"caption {i}", "another"]) for i, c in enumerate(COLOURS)])
    out = tmp_path / "o.json"
    run(["eval", "retrieval", "--model", f"openclip:{arch}/{weights}", "--manifest", str(manifest), "--name",
         "tiny-openclip", "--dataset-name", "toy", "--output", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert (result["model"], result["dataset"], result["n_images"], result["n_captions"]) == ("tiny-openclip", "toy",
                                                                                              4, 8)
    assert 0 <= result["img_r1"] <= result["img_r5"] <= 100


def test_zeroshot_linear_probe_finetune_and_report(tmp_path: Path, tiny_checkpoint: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    classes = ["red", "green", "blue", "yellow"]
    root = write_cifar(tmp_path / "cifar-10-batches-py", "cifar10", classes,
                       [(c, i) for i, c in enumerate(COLOURS)] * 3, [(c, i) for i, c in enumerate(COLOURS)])
    common = ["--dataset", str(root), "--format", "cifar10", "--no-progress"]
    run(["eval", "zeroshot", "--model", str(tiny_checkpoint), "--name", "tiny", "--output", str(tmp_path / "zs.json"),
         *common])
    run(["eval", "linear-probe", "--model", str(tiny_checkpoint), "--name", "tiny", "--max-iter", "50",
         "--output", str(tmp_path / "lp.json"), *common])
    run(["eval", "finetune-image", "--checkpoint", str(tiny_checkpoint), "--name", "tiny", "--epochs", "1",
         "--batch-size", "4", "--output", str(tmp_path / "ft.json"), *common])
    zs, lp, ft = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("zs", "lp", "ft"))
    assert [r["task"] for r in (zs, lp, ft)] == ["zeroshot", "linear_probe", "finetune_image"]
    assert {r["model"] for r in (zs, lp, ft)} == {"tiny"} and {r["dataset"] for r in (zs, lp, ft)} == {"cifar10"}
    assert (lp["n_train"], lp["n_test"]) == (12, 4) and ft["config"]["epochs"] == 1
    assert ft["config"]["batch_size"] == 4 and ft["config"]["lr"] == 1e-4  # unset flags keep the defaults

    run(["report", *(str(tmp_path / f"{n}.json") for n in ("zs", "lp", "ft")), "--output", str(tmp_path / "rep")])
    md = (tmp_path / "rep" / "report.md").read_text()
    # zero-shot table: ImageNet-1K (the paper's column) then CIFAR-10; 4 classes give no top-5
    assert f"| tiny |  | {zs['top1']:.2f} / - |" in md
    assert f"| tiny |  | {lp['top1']:.2f} / - |  |" in md and f"| tiny |  | {ft['top1']:.2f} / - |  |" in md
    assert "wrote" in capsys.readouterr().out


def test_glue_command(tmp_path: Path, tiny_checkpoint: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"sentence1": ["a red box", "the blue circle", "a big square", "red"] * 2,
            "sentence2": ["a box", "a circle", "a square", "blue"] * 2, "label": [0, 1, 0, 1] * 2}
    split = datasets.Dataset.from_dict(rows)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(tmp_path / "mrpc"))
    out = tmp_path / "mrpc.json"
    run(["eval", "glue", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "mrpc"), "--task", "mrpc",
         "--epochs", "1", "--batch-size", "4", "--max-length", "16", "--output", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert (result["task"], result["dataset"], result["glue_task"]) == ("glue", "glue/mrpc", "mrpc")
    assert set(result["metrics"]["validation"]) == {"f1", "accuracy"}
    assert result["config"]["lr"] == 2e-5 and result["config"]["schedule"] == "linear"  # BERT's recipe


def test_bad_input_exits_with_its_message(tmp_path: Path, tiny_checkpoint: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(["eval", "zeroshot", "--model", str(tiny_checkpoint), "--dataset", str(tmp_path / "none"),
             "--output", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert f"dataset {tmp_path / 'none'} is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["eval", "zeroshot", "--model", str(tmp_path / "missing.ckpt"), "--dataset", str(tmp_path),
             "--output", str(tmp_path / "x.json")])
    assert "missing.ckpt does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --checkpoint and --model are alternatives
        run(["eval", "retrieval", "--checkpoint", "a", "--model", "b", "--manifest", "m", "--output", "o"])
