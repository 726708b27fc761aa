"""Shared fixtures: tiny local stand-ins for pretrained towers and a generated captioned world."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}
WORDS = ("a an the red green blue yellow purple orange white black big small large tiny circle square "
         "triangle disc box shape on in at of left right top bottom center middle side").split()


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unialign.demo import make_text_model

    return make_text_model(tmp_path_factory.mktemp("bert"), [" ".join(WORDS)], hidden=64, layers=4, heads=4)


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unialign.demo import make_vit_checkpoint

    return make_vit_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pth", TINY_VIT)
