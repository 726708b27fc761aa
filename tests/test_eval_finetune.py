"""Fine-tuning: image classification head, GLUE text fine-tuning and metrics, retrieval fine-tune config."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_eval_support import write_cifar

from unialign.config import Config
from unialign.evaluation.finetune import ImageClassifier, finetune_image
from unialign.evaluation.glue import _Collate, f1, finetune_glue, glue_metrics, mcc, pearson, spearman, task_score
from unialign.evaluation.specs import GLUE_DEFAULTS, GLUE_TASKS, EvalError, FinetuneConfig, with_overrides

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- GLUE metrics


def test_glue_metrics_by_hand() -> None:
    pred, label = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    # tp=2, tn=1, fp=1, fn=1
    assert f1(pred, label) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert mcc(pred, label) == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))
    assert mcc(np.ones(4), np.array([1, 0, 1, 0])) == 0.0  # constant prediction: sklearn's 0
    assert glue_metrics("mrpc", pred, label) == pytest.approx({"f1": 400 / 6, "accuracy": 60.0})
    assert glue_metrics("sst2", pred, label) == {"accuracy": 60.0}
    assert task_score({"validation_matched": {"accuracy": 80.0}, "validation_mismatched": {"accuracy": 70.0}}) == 75.0


def test_glue_metrics_match_sklearn_and_scipy() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    pred, label = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    assert mcc(pred, label) == pytest.approx(sk.matthews_corrcoef(label, pred))
    assert f1(pred, label) == pytest.approx(sk.f1_score(label, pred))
    x = rng.normal(size=200)
    y = np.round(x + rng.normal(size=200), 1)  # rounding makes ties, which Spearman averages
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    cola = glue_metrics("cola", pred, label)
    assert cola == pytest.approx({"mcc": 100 * sk.matthews_corrcoef(label, pred)})
    stsb = glue_metrics("stsb", x, y)
    assert stsb == pytest.approx({"pearson": 100 * stats.pearsonr(x, y)[0], "spearman": 100 * stats.spearmanr(x, y)[0]})


# --------------------------------------------------------------------------------------- GLUE fine-tuning


WORDS = ["red", "blue", "green", "big", "small", "circle", "square", "box", "the", "a", "is", "on", "left"]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))


def _save_task(path: Path, task: str, n: int = 8) -> Path:
    datasets = pytest.importorskip("datasets")
    spec = GLUE_TASKS[task]
    rng = random.Random(0)
    splits = {}
    for split in ("train", *spec.eval_splits):
        rows: dict[str, list] = {k: [] for k in spec.text_keys if k}
        rows["label"] = []
        for _ in range(n):
            for key in rows:
                if key != "label":
                    rows[key].append(_sentence(rng))
            first = rows[spec.text_keys[0]][-1]
            rows["label"].append(float(first.count("red")) if spec.num_labels == 1
                                 else int("red" in first) % spec.num_labels)
        splits[split] = datasets.Dataset.from_dict(rows)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("task", ["cola", "stsb", "mnli"])
def test_finetune_glue_reports_the_task_metrics(task: str, tmp_path: Path, tiny_checkpoint: Path) -> None:
    data = _save_task(tmp_path / task, task)
    cfg = with_overrides(GLUE_DEFAULTS, epochs=2, batch_size=8, lr=1e-3)
    result = finetune_glue(tiny_checkpoint, data, task, cfg, max_length=16, device="cpu", progress=False)
    spec = GLUE_TASKS[task]
    assert (result["task"], result["dataset"], result["glue_task"]) == ("glue", f"glue/{task}", task)
    assert set(result["metrics"]) == set(spec.eval_splits)
    for metrics in result["metrics"].values():
        assert set(metrics) == set(spec.metrics)
        assert all(np.isfinite(v) for v in metrics.values())
    assert result["score"] == pytest.approx(task_score(result["metrics"]))
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["config"]["epochs"] == 2 and result["config"]["lr"] == 1e-3


def test_pairs_are_tokenized_with_segment_ids(tiny_checkpoint: Path) -> None:
    import unialign

    _, _, tokenizer = unialign.load(tiny_checkpoint)
    tokens, labels = _Collate(tokenizer.tokenizer, GLUE_TASKS["rte"], 32)(
        [{"sentence1": "a red box", "sentence2": "the box is red", "label": 1}])
    assert labels.tolist() == [1]
    sep = tokenizer.tokenizer.sep_token_id
    ids, segments = tokens["input_ids"][0].tolist(), tokens["token_type_ids"][0].tolist()
    assert ids.count(sep) == 2 and segments[: ids.index(sep) + 1] == [0] * (ids.index(sep) + 1)
    assert set(segments[ids.index(sep) + 1:]) == {1}


def test_glue_data_errors(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(EvalError, match="no dataset_dict.json"):
        finetune_glue(tiny_checkpoint, tmp_path, "cola", device="cpu", progress=False)
    data = _save_task(tmp_path / "sst", "sst2")
    with pytest.raises(EvalError, match="has no field 'question1'"):
        finetune_glue(tiny_checkpoint, data, "qqp", device="cpu", progress=False)
    with pytest.raises(EvalError, match="unknown GLUE task 'glue'"):
        finetune_glue(tiny_checkpoint, data, "glue", device="cpu", progress=False)


# --------------------------------------------------------------------------------------- image fine-tuning


def test_image_finetune_learns_colours(tmp_path: Path, tiny_checkpoint: Path) -> None:
    rng = np.random.default_rng(0)

    def items(n: int) -> list:
        return [((0.8 + 0.2 * rng.random(), 0.1, 0.1), 0) if i % 2 == 0 else ((0.1, 0.1, 0.8 + 0.2 * rng.random()), 1)
                for i in range(n)]

    root = write_cifar(tmp_path / "cifar-10-batches-py", "cifar10", ["red", "blue"], items(16), items(8))
    cfg = FinetuneConfig(epochs=3, batch_size=8, lr=1e-3, warmup_fraction=0.0, label_smoothing=0.0)
    result = finetune_image(tiny_checkpoint, root, root, "cifar10", cfg=cfg, train_scale=(0.8, 1.0), device="cpu",
                            progress=False)
    assert (result["task"], result["dataset"]) == ("finetune_image", "cifar10")
    assert (result["n_train"], result["n_test"], result["n_classes"]) == (16, 8, 2)
    assert result["top1"] == 100.0
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]


def test_image_head_pools_patch_tokens(tiny_checkpoint: Path) -> None:
    import unialign

    model, _, _ = unialign.load(tiny_checkpoint)
    clf = ImageClassifier(model, 5).eval()
    assert clf.n_prefix == 1
    with torch.no_grad():
        logits = clf(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5)
    names = [n for n, _ in clf.trainable()]
    assert any(n.startswith("smke.image_tower.") for n in names) and any(n.startswith("smke.shared.") for n in names)
    assert not any(n.startswith(("smke.text_tower.", "smke.kd_head.")) for n in names)


def test_finetune_config_is_checked() -> None:
    with pytest.raises(EvalError, match="warmup_fraction=1.5"):
        FinetuneConfig(warmup_fraction=1.5)
    assert with_overrides(GLUE_DEFAULTS, lr=None, epochs=7).epochs == 7


# --------------------------------------------------------------------------------------- retrieval fine-tune config


def test_finetune_retrieval_config_is_the_spec_recipe() -> None:
    cfg = Config.model_validate(yaml.safe_load((REPO / "configs" / "finetune_retrieval.yaml").read_text()))
    assert cfg.model.init_checkpoint is not None and cfg.model.init_checkpoint.name == "final.ckpt"
    assert cfg.loss.kd == "none" and cfg.loss.itc_interm is False and not cfg.teacher.enabled
    assert cfg.train.batch_size * cfg.train.devices == 1024
    assert cfg.train.base_lr == 3e-5 and cfg.train.scale_lr is False and cfg.train.epochs == 5
    assert cfg.data.train_scale == (0.5, 1.0)
