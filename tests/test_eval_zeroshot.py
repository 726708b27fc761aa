"""Zero-shot classification: readers, prompts, metrics and the end-to-end numbers on crafted data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_eval_support import ColourModel, write_cifar, write_folder

from unialign.evaluation.classification import (classification_metrics, read_cifar, read_class_map, read_image_folder,
                                                read_imagenet, read_templates)
from unialign.evaluation.models import EvalError
from unialign.evaluation.zeroshot import evaluate_zeroshot, zeroshot_classifier

RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
ORANGE = (1.0, 0.8, 0.0)  # cosine 0.78 with red, 0.62 with green


def test_classification_metrics_by_hand() -> None:
    logits = torch.tensor([
        [3.0, 2.0, 1.0, 0.0, -1.0, -2.0],  # true 0: rank 0
        [3.0, 2.0, 1.0, 0.0, -1.0, -2.0],  # true 2: rank 2
        [1.0, 1.0, 0.0, 0.0, 0.0, 0.0],    # true 1: tied with class 0 -> counts against: rank 1
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],    # true 5: all tied -> rank 5, outside top-5
    ])
    labels = torch.tensor([0, 2, 1, 5])
    m = classification_metrics(logits, labels)
    assert m["top1"] == pytest.approx(25.0)
    assert m["top5"] == pytest.approx(75.0)
    # per class: class 0 1/1, class 1 0/1, class 2 0/1, class 5 0/1 -> 25%
    assert m["mean_per_class_recall"] == pytest.approx(25.0)


def test_mean_per_class_recall_matches_sklearn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=gen)
    labels = torch.randint(0, 7, (200,), generator=gen)
    m = classification_metrics(logits, labels)
    expected = sklearn_metrics.balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    assert m["mean_per_class_recall"] == pytest.approx(100 * expected)
    assert m["top1"] == pytest.approx(100 * sklearn_metrics.accuracy_score(labels.numpy(), logits.argmax(1).numpy()))


def test_top5_omitted_with_fewer_classes() -> None:
    assert "top5" not in classification_metrics(torch.eye(3), torch.tensor([0, 1, 2]))


def test_classifier_averages_normalised_prompt_embeddings() -> None:
    model = ColourModel()
    w = zeroshot_classifier(model, ["red", "green"], ["a {c} thing", "{c} and blue"], progress=False)
    s = 2 ** -0.5
    red = F.normalize(torch.tensor([1.0, 0, 0]) + torch.tensor([s, 0, s]), dim=0)
    green = F.normalize(torch.tensor([0, 1.0, 0]) + torch.tensor([0, s, s]), dim=0)
    assert torch.allclose(w, torch.stack([red, green]), atol=1e-5)


def test_zeroshot_on_crafted_cifar10(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "cifar-10-batches-py", "cifar10", ["red", "green", "blue"], [],
                       [(RED, 0), (GREEN, 1), (BLUE, 2), (ORANGE, 1), (ORANGE, 0)])
    result = evaluate_zeroshot(ColourModel(), root, "cifar10", progress=False)
    # orange is closest to red: right for the 5th image, wrong for the 4th (labelled green)
    assert result["top1"] == pytest.approx(80.0)
    assert "top5" not in result  # 3 classes
    assert result["mean_per_class_recall"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    assert (result["task"], result["model"], result["dataset"]) == ("zeroshot", "colour", "cifar10")
    assert result["n_images"] == 5 and result["n_classes"] == 3 and result["n_templates"] == 18


def test_zeroshot_folder_counts_unreadable_files(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "colours", {"red": [RED, RED], "blue": [BLUE]})
    (root / "blue" / "broken.png").write_bytes(b"not a png")
    templates = tmp_path / "t.txt"
    templates.write_text("# comment\na photo of {c}\n")
    result = evaluate_zeroshot(ColourModel(), root, "folder", templates=templates, progress=False)
    assert result["top1"] == 100.0 and result["n_images"] == 3 and result["images_skipped"] == 1
    assert result["skipped"][0]["image"].endswith("broken.png")
    assert result["dataset"] == "colours" and result["n_templates"] == 1


def test_readers_cifar100_and_folder(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "cifar-100-python", "cifar100", ["aquarium_fish", "red"],
                       [(RED, 1), (GREEN, 0)], [(BLUE, 0)])
    train = read_cifar(root, "cifar100", "train")
    assert train.classes == ["aquarium fish", "red"] and train.labels == [1, 0]
    assert train.arrays is not None and train.arrays.shape == (2, 32, 32, 3)
    assert tuple(train.arrays[0, 5, 7]) == (255, 0, 0)  # channel planes reassembled as RGB
    folder = read_image_folder(write_folder(tmp_path / "f", {"b_class": [BLUE], "a": [RED, RED]}))
    assert folder.classes == ["a", "b class"] and folder.labels == [0, 0, 1]


def test_cifar_reader_refuses_foreign_pickles(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": [b"x"], "evil": print}))
    with pytest.raises(EvalError, match="refusing to load"):
        read_cifar(root, "cifar10", "test")
    with pytest.raises(EvalError, match="test_batch does not exist"):
        (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"]}))
        read_cifar(root, "cifar10", "test")


def test_imagenet_layout_with_class_maps(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "val", {"n01443537": [GREEN], "n01440764": [RED, RED]})
    shipped = read_imagenet(root)
    assert len(shipped.classes) == 1000 and shipped.classes[:2] == ["tench", "goldfish"]
    assert shipped.labels == [0, 0, 1]
    keras = tmp_path / "index.json"
    keras.write_text(json.dumps({"1": ["n01440764", "red fish"], "0": ["n01443537", "green fish"]}))
    mapped = read_imagenet(root, keras)
    assert mapped.classes == ["green fish", "red fish"] and mapped.labels == [1, 1, 0]
    loc = tmp_path / "LOC_synset_mapping.txt"
    loc.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    assert read_class_map(loc) == [("n01440764", "tench"), ("n01443537", "goldfish")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n01440764": ["x"]}))
    with pytest.raises(EvalError, match="class indices"):
        read_class_map(bad)
    with pytest.raises(EvalError, match="folder 'n01443537' is not in the class map"):
        loc.write_text("n01440764 tench\n")
        read_imagenet(root, loc)


def test_zeroshot_imagenet_end_to_end(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "val", {"n1": [RED], "n2": [GREEN], "n3": [BLUE]})
    mapping = tmp_path / "map.txt"
    mapping.write_text("n1 red\nn2 green\nn3 blue\nn4 black\nn5 white\nn6 grey\n")
    result = evaluate_zeroshot(ColourModel(), root, "imagenet", class_map=mapping, progress=False)
    assert result["dataset"] == "imagenet1k" and result["n_classes"] == 6
    assert result["top1"] == 100.0 and result["top5"] == 100.0


def test_templates() -> None:
    assert len(read_templates(fmt="imagenet")) == 80
    assert len(read_templates(fmt="cifar10")) == 18
    assert all("{c}" in t for t in read_templates())


def test_template_without_slot_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of {c}\na photo\n")
    with pytest.raises(EvalError, match=r"t.txt:2: template has no '\{c\}' slot"):
        read_templates(bad)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="is not a directory"):
        read_image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(EvalError, match="no image files"):
        read_image_folder(tmp_path / "empty")
