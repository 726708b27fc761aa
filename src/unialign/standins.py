"""Local stand-ins for pretrained towers: tiny random models saved the way real ones are.

`unialign demo` uses them where a real asset is not installed, and the tests (tests/conftest.py)
and benchmarks (bench/) build their tiny towers with them: a BERT folder that loads like a hub
model, and a small ViT's weights as a local timm checkpoint file. Both are seeded, so a stand-in
is the same model every time it is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_VIT = {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4}
STANDIN_VIT = "vit_small_patch16_224"  # the timm architecture TINY_VIT shrinks


def make_text_model(directory: Path, captions: list[str], hidden: int = 96, layers: int = 4, heads: int = 4) -> Path:
    """A randomly initialised BERT saved like a hub model (config + weights + tokenizer).

    Its vocabulary is the captions' words plus single letters and ``##`` letters, so any
    word still tokenises (letter by letter) when it is not in the vocabulary.
    """
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
    import timm

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    model = timm.create_model(STANDIN_VIT, pretrained=False, num_classes=0, **kwargs)
    torch.save(model.state_dict(), path)
    return path
