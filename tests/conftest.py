"""Shared fixtures: tiny local stand-ins for pretrained towers and a generated captioned world."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}


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
