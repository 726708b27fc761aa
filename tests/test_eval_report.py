"""`unialign report`: result JSONs placed in the paper's table layout beside its published numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unialign.evaluation.models import EvalError
from unialign.evaluation.report import build_report, published_results, read_results


def _retrieval(model: str, dataset: str, base: float, n_images: int, n_captions: int) -> dict:
    r = {"task": "retrieval", "model": model, "dataset": dataset, "n_images": n_images, "n_captions": n_captions,
         "skipped": [{"path": "x", "reason": "y"}]}
    for i, k in enumerate((1, 5, 10)):
        r[f"txt_r{k}"] = base + 10 * i
        r[f"img_r{k}"] = base - 10 + 10 * i
    return r


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_report_tables(tmp_path: Path) -> None:
    files = [
        _write(tmp_path / "coco.json", _retrieval("s-smke", "coco", 50.0, 5000, 25010)),
        _write(tmp_path / "flickr.json", _retrieval("s-smke", "flickr30k", 70.0, 1000, 5000)),
        _write(tmp_path / "clip.json", [_retrieval("openclip:ViT-B-32/openai", "coco", 30.0, 4999, 25005)]),
        _write(tmp_path / "zs.json", {"task": "zeroshot", "model": "s-smke", "dataset": "imagenet1k",
                                      "top1": 36.5, "top5": 64.25}),
        _write(tmp_path / "lp.json", {"task": "linear_probe", "model": "s-smke", "dataset": "cifar10", "top1": 88.0,
                                      "top5": 99.0, "sweep": [{"l2": 1, "val_acc": 2}]}),
        _write(tmp_path / "cola.json", {"task": "glue", "model": "s-smke", "dataset": "glue/cola", "glue_task": "cola",
                                        "score": 40.0}),
        _write(tmp_path / "sst2.json", {"task": "glue", "model": "s-smke", "dataset": "glue/sst2", "glue_task": "sst2",
                                        "score": 80.0}),
    ]
    report = build_report(files, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| model | COCO 5K TR"))
    assert header == "| model | COCO 5K TR | COCO 5K IR | Flickr30K 1K TR | Flickr30K 1K IR |"
    assert "| s-smke | 50.00/60.00/70.00 | 40.00/50.00/60.00 | 70.00/80.00/90.00 | 60.00/70.00/80.00 |" in lines
    # a gallery of another size than COCO 5K is flagged and explained, the missing dataset left empty
    assert "| openclip:ViT-B-32/openai | 30.00/40.00/50.00 * | 20.00/30.00/40.00 * |  |  |" in lines
    assert any("4999 images / 25005 captions, not the paper's 5000 / 25010" in line for line in lines)
    # the paper's rows, from the SPEC
    assert ("| _S-SMKE (paper; zero-shot on Flickr)_ | 53.54/81.10/89.52 | 35.65/66.00/77.77 | 70.90/92.10/96.00 "
            "| 52.72/80.20/87.46 |") in lines
    assert "| _FLAVA, zero-shot (paper)_ | 42.74/76.76/- | 38.38/67.47/- | 67.70/94.00/- | 65.22/89.38/- |" in lines
    assert "| s-smke | 36.50 / 64.25 |" in lines
    assert "| _S-SMKE (paper; 80 templates)_ | 37.00 / - |" in lines
    assert "| model | ImageNet-1K | CIFAR-10 | CIFAR-100 |" in lines  # linear probe columns incl. the paper's
    assert "| s-smke |  | 88.00 / 99.00 |  |" in lines
    assert "| s-smke | 40.00 | 80.00 | 60.00 (2) |" in lines  # GLUE: cola, sst2, mean over 2 tasks
    assert "| _S-SMKE (paper)_ |  |  | 61.30 |" in lines
    assert report["files"]["plot"] is None or (tmp_path / "out" / "recall_at_k.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(saved["results"]) == 7 and "skipped" not in saved["results"][0] and "sweep" not in saved["results"][4]
    assert saved["published"]["source"].startswith("The paper's reported results (docs/METHOD.md")


def test_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = build_report([_write(tmp_path / "r.json", _retrieval("m", "coco", 50.0, 5000, 25010))], tmp_path / "o")
    assert report["files"]["plot"] == "recall_at_k.png"
    assert (tmp_path / "o" / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![recall@K](recall_at_k.png)" in (tmp_path / "o" / "report.md").read_text()


def test_later_file_replaces_earlier_with_a_note(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", _retrieval("m", "coco", 10.0, 5000, 25010))
    b = _write(tmp_path / "b.json", _retrieval("m", "coco", 20.0, 5000, 25010))
    report = build_report([a, b], tmp_path / "o")
    assert any("b.json replaces" in n for n in report["notes"])
    assert "| m | 20.00/30.00/40.00 |" in (tmp_path / "o" / "report.md").read_text()


def test_result_files_must_say_what_they_are(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match=r"bad.json: field 'model' is missing"):
        read_results([_write(tmp_path / "bad.json", {"task": "retrieval", "dataset": "coco"})])
    with pytest.raises(EvalError, match=r"field 'task' is 'vqa'"):
        read_results([_write(tmp_path / "vqa.json", {"task": "vqa", "model": "m", "dataset": "d"})])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(EvalError, match="broken.json: not valid JSON"):
        read_results([tmp_path / "broken.json"])


def test_published_numbers_are_the_specs() -> None:
    pub = published_results()
    final = pub["retrieval"][0]
    assert final["coco"]["txt_r1"] == 53.54 and final["flickr30k"]["img_r10"] == 87.46
    assert pub["glue"][0]["score"] == 61.3 and pub["zeroshot"][0]["imagenet1k"]["top1"] == 37.0


def test_clip_benchmark_results_are_converted(tmp_path: Path) -> None:
    files = [
        _write(tmp_path / "cls.json", {"dataset": "imagenet1k", "model": "ViT-B-32", "pretrained": "openai",
                                       "task": "zeroshot_classification", "language": "en",
                                       "metrics": {"acc1": 0.632, "acc5": 0.884, "mean_per_class_recall": 0.63}}),
        _write(tmp_path / "ret.json", {"dataset": "flickr30k", "model": "ViT-B-32", "pretrained": "openai",
                                       "task": "zeroshot_retrieval", "language": "en",
                                       "metrics": {"image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": 0.75}}),
    ]
    cls, ret = read_results(files)
    assert (cls["task"], cls["model"], cls["dataset"]) == ("zeroshot", "ViT-B-32 openai", "imagenet1k")
    assert cls["top1"] == pytest.approx(63.2) and cls["top5"] == pytest.approx(88.4)
    assert (ret["task"], ret["dataset"], ret["txt_r1"], ret["img_r1"]) == ("retrieval", "flickr30k", 75.0, 50.0)
    report = build_report(files, tmp_path / "o")
    md = (tmp_path / "o" / "report.md").read_text()
    assert "| ViT-B-32 openai |  |  | 75.00/-/- | 50.00/-/- |" in md and "| ViT-B-32 openai | 63.20 / 88.40 |" in md
    assert any("gallery size not recorded" in n for n in report["notes"])
