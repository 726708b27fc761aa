"""`unialign demo`: the whole path (data -> train with KD -> retrieval eval -> search) offline.

Hub downloads are impossible offline, so the demo makes its own small stand-ins: a generated
captioned-shapes world, a small BERT-shaped text model with a WordPiece vocabulary of the
world's words, and a small ViT teacher saved as a local checkpoint file. The same local
paths a researcher would use for real weights are exercised (HF directory, timm file).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import timm
import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_VIT = {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4}


def make_text_model(directory: Path, captions: list[str], hidden: int = 96, layers: int = 4, heads: int = 4) -> Path:
    """A randomly initialised BERT saved like a hub model (config + weights + tokenizer)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = {w for c in captions for w in c.lower().replace(",", " ").split()}
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = SPECIAL_TOKENS + sorted(words | set(letters) | {f"##{ch}" for ch in letters})
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(directory)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    return directory


def make_vit_checkpoint(path: Path, kwargs: dict[str, Any]) -> Path:
    """A small ViT's weights saved as a local timm checkpoint file (the path for non-hub weights)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **kwargs)
    torch.save(model.state_dict(), path)
    return path


def demo_config(root: Path, karpathy: Path, text_dir: Path, teacher_ckpt: Path, quick: bool) -> dict[str, Any]:
    return {
        "seed": 0,
        "model": {
            "image": {"backend": "timm", "name": "vit_small_patch16_224", "pretrained": False,
                      "layers": 2, "kwargs": TINY_VIT},
            "text": {"name": str(text_dir), "pretrained": True, "layers": 2, "max_length": 32},
            "shared": {"depth": 1, "num_heads": 4},
        },
        "teacher": {"backend": "timm", "name": "vit_small_patch16_224", "pretrained": False,
                    "checkpoint": str(teacher_ckpt), "kwargs": TINY_VIT},
        "loss": {"bank_size": 512},
        "data": {
            "train": [{"type": "karpathy", "path": str(karpathy), "images": str(root),
                       "splits": ["train"]}],
            "val": {"type": "karpathy", "path": str(karpathy), "images": str(root)},
            "image_size": 64,
            "hflip": False,  # captions say "left" and "right"
            "num_workers": 0,
        },
        "train": {
            "epochs": 2 if quick else 6, "batch_size": 32, "base_lr": 2e-3, "warmup_fraction": 0.1,
            "precision": "32-true", "accelerator": "auto", "devices": 1,
            "checkpoint_every_steps": 50, "log_every_steps": 5,
        },
    }


def run_demo(output: Path, quick: bool = False) -> dict[str, Any]:
    from .config import parse_config, save_config
    from .data.records import read_karpathy
    from .data.synthetic import make_synthetic_karpathy
    from .evaluation.run import evaluate_retrieval, write_json
    from .training.trainer import CHECKPOINT_DIR, FINAL, train

    output = Path(output)
    assets = output / "assets"
    n_images = 200 if quick else 600
    karpathy = make_synthetic_karpathy(assets, n_images=n_images, captions_per_image=2, image_size=64, seed=0,
                                       split_counts={"train": n_images - 100, "val": 50, "test": 50})
    captions = [r.caption for r in read_karpathy(karpathy, assets, ["train", "val", "test"]).records]
    text_dir = make_text_model(assets / "text_model", captions)
    teacher_ckpt = make_vit_checkpoint(assets / "teacher.pth", TINY_VIT)
    cfg = parse_config(demo_config(assets, karpathy, text_dir, teacher_ckpt, quick), source="demo")
    run_dir = output / "run"
    save_config(cfg, output / "demo_config.yaml")
    train(cfg, run_dir, resume=(run_dir / CHECKPOINT_DIR / "last.ckpt").is_file())
    result = evaluate_retrieval(run_dir / CHECKPOINT_DIR / FINAL, karpathy, assets, "test")
    write_json(result, output / "retrieval_test.json")
    keys = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
    print("\nRetrieval on the held-out test split (%d images, %d captions):" % (result["n_images"],
                                                                                result["n_captions"]))
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    print("| " + " | ".join(f"{result[k]:.1f}" for k in keys) + " |")
    print(f"(chance R@1 is about {100 / result['n_images']:.1f}%)\nresults: {output / 'retrieval_test.json'}")
    print(json.dumps({k: round(result[k], 2) for k in keys}))
    return result
