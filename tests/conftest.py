"""Shared fixtures: tiny local stand-ins for pretrained towers and a generated captioned world."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}
REPO = Path(__file__).resolve().parents[1]


def bench_module(script: str):
    """A script of bench/ imported as a module (bench/ is not a package; on the path, as for a script run
    from it, so that a script can import its sibling modules)."""
    import importlib.util
    import sys

    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", REPO / "bench" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so a worker pool can pickle its functions by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unialign.data.synthetic import vocabulary
    from unialign.standins import make_text_model

    return make_text_model(tmp_path_factory.mktemp("bert"), [" ".join(vocabulary())], hidden=64, layers=4,
                           heads=4)


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unialign.standins import make_vit_checkpoint

    return make_vit_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pth", TINY_VIT)


def tiny_config_dict(text_model_dir: Path, teacher_checkpoint: Path, train_sources: list[dict],
                     val_source: dict | None = None, **train: object) -> dict:
    """A complete run config with tiny towers; `train` overrides the train section."""
    return {
        "seed": 0,
        "model": {
            "image": {"name": "vit_small_patch16_224", "pretrained": False, "layers": 2, "kwargs": TINY_VIT},
            "text": {"name": str(text_model_dir), "layers": 2, "max_length": 16},
            "shared": {"depth": 1, "num_heads": 4},
        },
        "teacher": {"name": "vit_small_patch16_224", "pretrained": False, "checkpoint": str(teacher_checkpoint),
                    "kwargs": TINY_VIT},
        "loss": {"bank_size": 64},
        "data": {"train": train_sources, "val": val_source, "image_size": 32, "num_workers": 0, "hflip": False},
        "train": {"epochs": 1, "batch_size": 8, "precision": "32-true", "accelerator": "cpu", "devices": 1,
                  "progress_bar": False, "checkpoint_every_steps": 1000, "log_every_steps": 1, **train},
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, text_model_dir: Path, teacher_checkpoint: Path) -> Path:
    """An untrained tiny model exported as an inference checkpoint (for eval/embed/search tests)."""
    import torch
    from transformers import AutoTokenizer

    from unialign.config import InferenceConfig, ModelConfig, Preprocess
    from unialign.model.factory import create_student, export_checkpoint

    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [])
    spec = InferenceConfig(model=ModelConfig.model_validate(raw["model"]), kd_dim=64,
                           preprocess=Preprocess(image_size=raw["data"]["image_size"]))
    torch.manual_seed(0)
    model = create_student(spec)
    return export_checkpoint(model, spec, AutoTokenizer.from_pretrained(text_model_dir),
                             tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


# ---------------------------------------------------------------------------------------
# A small captioned world whose training view equals the eval view, and a teacher cache of it
# (test_teacher_cache.py, test_step_speed.py).


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic Karpathy images (16 train, 8 val), 2 captions each."""
    from unialign.data import make_synthetic_karpathy

    root = tmp_path_factory.mktemp("speed_world")
    make_synthetic_karpathy(root, n_images=24, captions_per_image=2, image_size=32, seed=3,
                            split_counts={"train": 16, "val": 8})
    return root


def eval_view_config(world: Path, text_model_dir: Path, teacher_checkpoint: Path, splits=("train",),
                     **train_kw: object) -> dict:
    """A tiny run config on `world` in which the student (and so the teacher) sees the eval view.

    ``data.train_scale: [1, 1]`` takes the whole image, resized as the eval transform does, and
    ``data.hflip: false`` (tiny_config_dict) removes the flip, so cached and online teacher targets
    must agree exactly."""
    src = {"type": "karpathy", "path": str(world / "dataset_synthetic.json"), "images": str(world),
           "splits": list(splits)}
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [src], **train_kw)
    raw["data"]["train_scale"] = [1.0, 1.0]  # with hflip false (above): the student sees the eval view
    raw["loss"]["bank_size"] = 12  # fills and wraps within a few steps of 8 pairs
    return raw


def with_teacher_cache(raw: dict, cache: Path) -> dict:
    """A copy of the config `raw` that reads teacher targets from `cache`."""
    import copy

    raw = copy.deepcopy(raw)
    raw["teacher"]["cache"] = str(cache)
    return raw


def train_batches(cfg, n: int) -> list[dict]:
    """The first `n` training batches of `cfg`, as the training step receives them."""
    from unialign.model.factory import create_tokenizer
    from unialign.training.datamodule import RetrievalDataModule

    dm = RetrievalDataModule(cfg.data, create_tokenizer(cfg), cfg.model.text.max_length, cfg.train.batch_size,
                             cfg.seed)
    it = iter(dm.train_dataloader())
    return [dm.on_after_batch_transfer(next(it), 0) for _ in range(n)]  # what Lightning does after the copy


@pytest.fixture(scope="session")
def teacher_cache_dir(small_world: Path, text_model_dir: Path, teacher_checkpoint: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished teacher cache of small_world's train split (float32, built on the CPU)."""
    from unialign.config import parse_config
    from unialign.training.cache_build import build_teacher_cache

    cfg = parse_config(eval_view_config(small_world, text_model_dir, teacher_checkpoint))
    # On the CPU in float32, like the online teacher the tests compare with (on a GPU machine the
    # pass would default to CUDA under bf16: 2e-3 apart, measured on an H100).
    return build_teacher_cache(cfg, tmp_path_factory.mktemp("cache") / "c", dtype="float32", batch_size=5,
                               num_workers=0, chunk_size=7, progress=False, device="cpu", precision="32")
