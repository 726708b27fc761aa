"""The CLIP_benchmark hook: its own retrieval and classification code runs a unialign checkpoint
and agrees with unialign's evaluation of the same data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from test_eval_support import write_cifar

pytest.importorskip("clip_benchmark.models")  # imports open_clip too

from clip_benchmark.datasets.builder import image_captions_collate_fn  # noqa: E402
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval  # noqa: E402
from clip_benchmark.models import MODEL_TYPES, load_clip  # noqa: E402

from unialign.evaluation import clip_benchmark as hook  # noqa: E402
from unialign.evaluation.models import load_eval_model  # noqa: E402
from unialign.evaluation.retrieval import retrieval_metrics  # noqa: E402
from unialign.evaluation.zeroshot import evaluate_zeroshot  # noqa: E402

CAPTIONS = [["a red square on the left", "a red box"], ["a big blue circle"], ["green triangle at the top", "a wedge"],
            ["the small pink diamond"], ["orange cross in the middle", "a plus sign", "an orange shape"]]


class _Captioned(Dataset):
    def __init__(self, transform) -> None:
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in CAPTIONS]
        self.transform = transform

    def __len__(self) -> int:
        return len(CAPTIONS)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), CAPTIONS[i]


class _Classified(Dataset):
    """CIFAR images as CLIP_benchmark expects them: (pixels, target) items and a `classes` list."""

    def __init__(self, root: Path, transform) -> None:
        from unialign.evaluation.classification import read_cifar

        self.data = read_cifar(root, "cifar100", "test")
        self.classes = self.data.classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.transform(self.data.image(i)), self.data.labels[i]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path):
    hook.register()
    hook.register()  # idempotent
    assert MODEL_TYPES.count("unialign") == 1
    return load_clip("unialign", model_name="s-smke", pretrained=str(tiny_checkpoint), cache_dir=None, device="cpu")


def test_zeroshot_retrieval_through_the_hook(loaded, tiny_checkpoint: Path) -> None:
    model, transform, tokenizer = loaded
    assert isinstance(tokenizer(["a red box"]), torch.Tensor)
    loader = DataLoader(_Captioned(transform), batch_size=2, collate_fn=image_captions_collate_fn)
    ks = [1, 2, 5]
    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=ks)

    ours_model = load_eval_model(tiny_checkpoint, "cpu")
    data = _Captioned(ours_model.preprocess)
    with torch.no_grad():
        images = ours_model.encode_image(torch.stack([data[i][0] for i in range(len(data))]))
    texts = ours_model.encode_texts([c for caps in CAPTIONS for c in caps], progress=False)
    owner = torch.tensor([i for i, caps in enumerate(CAPTIONS) for _ in caps])
    ours = retrieval_metrics(images, texts, owner, ks=ks)
    for k in ks:
        for key in (f"image_retrieval_recall@{k}", f"text_retrieval_recall@{k}"):
            assert theirs[key] == pytest.approx(ours[key]), key


def _accuracy_numpy2(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """clip_benchmark 1.6.2's `accuracy` with `.item()`: its float(1-element array) fails on NumPy 2.4."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_zeroshot_classification_through_the_hook(loaded, tiny_checkpoint: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the final top-k counting is replaced; the classifier building and image encoding that
    # drive the unialign model are CLIP_benchmark's own code.
    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy_numpy2)
    model, transform, tokenizer = loaded
    rng = np.random.default_rng(1)
    classes = ["red", "blue", "green", "pink", "orange", "navy"]
    colours = [tuple(float(v) for v in rng.random(3)) for _ in range(18)]
    root = write_cifar(tmp_path / "cifar-100-python", "cifar100", classes, [],
                       [(c, i % len(classes)) for i, c in enumerate(colours)])
    templates = ["a photo of a {c}.", "a {c} shape."]
    loader = DataLoader(_Classified(root, transform), batch_size=4)
    theirs = zeroshot_classification.evaluate(model, loader, tokenizer, classes, templates, "cpu", amp=False)

    template_file = tmp_path / "templates.txt"
    template_file.write_text("\n".join(templates) + "\n")
    ours = evaluate_zeroshot(load_eval_model(tiny_checkpoint, "cpu"), root, "cifar100", templates=template_file,
                             progress=False)
    assert 100 * theirs["acc1"] == pytest.approx(ours["top1"])
    assert 100 * theirs["acc5"] == pytest.approx(ours["top5"])
    assert 100 * theirs["mean_per_class_recall"] == pytest.approx(ours["mean_per_class_recall"])


def test_loader_names_a_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a unialign checkpoint file"):
        hook.load_unialign("s-smke", str(tmp_path / "nope.ckpt"))


def test_clip_benchmark_command_line_with_the_hook(tiny_checkpoint: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """CLIP_benchmark's own CLI (COCO captions layout) on a unialign checkpoint; its JSON feeds `unialign report`."""
    pytest.importorskip("clip_benchmark.cli")  # needs pycocoevalcap + pycocotools
    import json

    from unialign.evaluation.report import build_report

    (tmp_path / "val2014").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, captions in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "val2014" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png"})
        annotations += [{"id": 10 * i + j, "image_id": i, "caption": c} for j, c in enumerate(captions)]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    out = tmp_path / "cb.json"
    monkeypatch.setattr("sys.argv", [
        "clip_benchmark", "eval", "--model_type", "unialign", "--model", "s-smke", "--pretrained", str(tiny_checkpoint),
        "--dataset", "mscoco_captions", "--dataset_root", str(tmp_path),
        "--annotation_file", str(tmp_path / "ann.json"),
        "--task", "zeroshot_retrieval", "--recall_k", "1", "5", "--no_amp", "--num_workers", "0",
        "--batch_size", "2", "--output", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        hook.main()
    assert not exit_info.value.code
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5)}
    assert metrics["image_retrieval_recall@5"] == 1.0  # 5 images: every caption's image is in its top 5

    report = build_report([out], tmp_path / "report")
    row = report["results"][0]
    assert (row["task"], row["model"], row["dataset"]) == ("retrieval", f"s-smke {tiny_checkpoint}", "coco")
    assert row["img_r5"] == 100.0 and row["txt_r1"] == pytest.approx(100 * metrics["text_retrieval_recall@1"])
