"""The workload of bench/train_step.py: the paper's models with random weights (built from local
configs, no download) and the baselines, their optimizer, pinned batches like the collator's, a
synthetic teacher cache, and the FLOPs of one step (counted and analytic). bench/rerank.py,
eval.py and train_run.py build the same shapes from here. Imported with bench/ on the path (as a
script run from it has)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# On import, so that it precedes the first transformers import and reaches the `unialign train`
# child that bench/train_run.py starts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BANK = 65_536

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}
TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256,
             "vocab_size": 1000, "max_position_embeddings": 128}


# ---------------------------------------------------------------------------------------
# Models


def unialign_config(small: bool, workdir: Path, cache: Path | None = None) -> Any:
    """The paper's architecture (random weights) as a unialign config; BERT-base from a local config file."""
    from transformers import BertConfig

    from unialign.config import Config

    text_dir = workdir / ("bert_tiny" if small else "bert_base")
    text_dir.mkdir(parents=True, exist_ok=True)
    (BertConfig(**TINY_BERT) if small else BertConfig()).save_pretrained(text_dir)  # config.json only
    image = {"name": "vit_base_patch16_224", "pretrained": False, "layers": 2 if small else 6}
    teacher = {"name": "beitv2_base_patch16_224", "pretrained": False}
    if small:
        image["kwargs"] = TINY_VIT
        teacher["kwargs"] = TINY_VIT
    if cache is not None:
        teacher["cache"] = str(cache)
    raw = {
        "model": {"image": image, "text": {"name": str(text_dir), "pretrained": False, "layers": 2 if small else 6,
                                           "max_length": 64},
                  "shared": {"depth": 1, "num_heads": 4 if small else 12}},
        "teacher": teacher,
        "loss": {"bank_size": 512 if small else BANK},
        "data": {"train": [{"type": "manifest", "path": "unused.jsonl"}], "image_size": 32 if small else 224},
    }
    return Config.model_validate(raw)


def build_unialign(cfg: Any, attention: str, compile_model: bool) -> nn.Module:
    from unialign.config import Config
    from unialign.training.task import DistillTask

    raw = cfg.model_dump(mode="json")
    raw["train"]["compile"] = compile_model
    module = DistillTask.from_config(Config.model_validate(raw))
    if attention == "eager":
        for m in module.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        module.model.text_tower.model.set_attn_implementation("eager")
    return module


def fill_bank(module: nn.Module, device: torch.device) -> None:
    """Steady state: a full bank with the write pointer mid-way (the wrap-around gather path)."""
    kd = getattr(module, "kd", None)
    if kd is None or kd.bank.size == 0:
        return
    g = torch.Generator().manual_seed(0)
    n = kd.bank.size + kd.bank.size // 3
    kd.bank.enqueue(F.normalize(torch.randn(n, kd.bank.dim, generator=g), dim=-1).to(device),
                    torch.randint(0, 2**62, (n,), generator=g).to(device))


class DualEncoder(nn.Module):
    """CLIP-style baseline: full ViT-B/16 + full BERT-base, linear projections, symmetric InfoNCE."""

    def __init__(self, small: bool) -> None:
        super().__init__()
        import timm
        from transformers import BertConfig, BertModel

        self.visual = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                                        **(TINY_VIT if small else {}))
        config = BertConfig(**TINY_BERT) if small else BertConfig()
        config._attn_implementation = "sdpa"
        self.text = BertModel(config, add_pooling_layer=False)
        dim = 64 if small else 512
        self.image_proj = nn.Linear(self.visual.embed_dim, dim, bias=False)
        self.text_proj = nn.Linear(config.hidden_size, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        img = F.normalize(self.image_proj(self.visual(batch["image"])), dim=-1)
        txt = self.text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        txt = F.normalize(self.text_proj(txt[:, 0]), dim=-1)
        logits = (self.logit_scale.clamp(0, math.log(100)).exp() * img @ txt.T).float()
        labels = torch.arange(len(img), device=img.device)
        return {"loss": (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2}


class OpenCLIP(nn.Module):
    """open_clip's ViT-B-16 (random weights; its own text transformer) with the CLIP loss."""

    def __init__(self, small: bool) -> None:
        super().__init__()
        import open_clip

        if small:
            self.model = open_clip.model.CLIP(
                embed_dim=64, vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                                          "head_width": 32},
                text_cfg={"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2})
        else:
            self.model = open_clip.create_model("ViT-B-16", pretrained=None)
        self.context_length = self.model.context_length

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(batch["image"], batch["clip_tokens"])
        if isinstance(out, dict):
            img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        else:
            img, txt, scale = out[:3]
        logits = (scale * img @ txt.T).float()
        labels = torch.arange(len(img), device=img.device)
        return {"loss": (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2}


def make_optimizer(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    """unialign's grouping: no decay on 1-d tensors and embeddings; the paper's betas and eps."""
    from unialign.model.smke import no_weight_decay_names, param_groups

    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else no_weight_decay_names(model)
    return torch.optim.AdamW(param_groups(model.named_parameters(), 0.01, no_decay),
                             lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=fused)


# ---------------------------------------------------------------------------------------
# Batches


def make_batch(batch: int, image_size: int, text_len: int, vocab: int, clip_len: int, seed: int,
               uint8: bool = False) -> dict:
    """A pinned host batch like the collator's: images (normalised float, or uint8 pixels as
    unialign's loader ships them with ``data.normalize_on_device``), padded token ids, masks."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(4, text_len // 3), text_len + 1, (batch,), generator=g)
    lengths[0] = text_len  # padded to the longest caption, as the collator does
    mask = (torch.arange(text_len)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (batch, text_len), generator=g) * mask
    ids[:, 0] = 101 if vocab > 2000 else 2
    shape = (batch, 3, image_size, image_size)
    image = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if uint8 else torch.randn(shape, generator=g)
    out = {"image": image,
           "input_ids": ids, "attention_mask": mask,
           "image_id": torch.randperm(10 * batch, generator=g)[:batch],
           "clip_tokens": torch.randint(1, vocab, (batch, clip_len), generator=g)}
    if torch.cuda.is_available():
        out = {k: v.pin_memory() for k, v in out.items()}
    return out


def synthetic_cache(workdir: Path, n: int, dim: int) -> Path:
    """A teacher cache of random targets, written in the real format (so lookups cost what they cost)."""
    from unialign.training.teacher_cache import FORMAT, VERSION

    path = workdir / f"cache_{n}_{dim}"
    if not (path / "meta.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        ids = np.sort(rng.choice(2**62, size=n, replace=False).astype(np.int64))
        targets = np.lib.format.open_memmap(path / "targets.npy", mode="w+", dtype=np.float16, shape=(n, dim))
        for i in range(0, n, 65536):
            block = rng.standard_normal((min(65536, n - i), dim)).astype(np.float32)
            targets[i:i + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        targets.flush()
        np.save(path / "image_ids.npy", ids)
        (path / "meta.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, "identity": {},
                                                    "count": n, "dim": dim, "dtype": "float16"}))
    return path


# ---------------------------------------------------------------------------------------
# FLOPs


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one step (forward + backward; the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    custom = {}
    # The CPU SDPA kernels have no formula in torch's counter; use the CUDA kernels' one.
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v))
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda grad, q, k, v, *a, **kw: sdpa_backward_flop_count(grad, q, k, v))
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        step()
    return int(counter.get_total_flops())


def vit_layer_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one pre-LN Transformer layer (matmuls + attention scores/values)."""
    return 2 * tokens * width * width * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * width


def analytic_flops(variant: str, batch: int, text_len: int, small: bool, clip_len: int = 77) -> float:
    """Training FLOPs per step: 3x forward for trained parts, 1x for the frozen teacher."""
    if small:
        size, patch, width, image_layers, teacher_layers, text_width, bank = 32, 8, 64, 2, 4, 64, 512
    else:
        size, patch, width, image_layers, teacher_layers, text_width, bank = 224, 16, 768, 6, 12, 768, BANK
    n_img = (size // patch) ** 2 + 1
    patch_embed = 2 * (n_img - 1) * 3 * patch * patch * width
    if variant.startswith("clip"):
        layers = 4 if small else 12
        fwd = layers * vit_layer_flops(n_img, width) + patch_embed + layers * vit_layer_flops(text_len, text_width)
        return 3 * batch * fwd
    if variant.startswith("openclip"):
        w_img, w_txt, layers_v, layers_t, ctx = (64, 64, 2, 2, 16) if small else (768, 512, 12, 12, clip_len)
        fwd = layers_v * vit_layer_flops(n_img, w_img) + patch_embed + layers_t * vit_layer_flops(ctx, w_txt)
        return 3 * batch * fwd
    text_layers = 2 if small else 6
    student = (image_layers * vit_layer_flops(n_img, width) + patch_embed + vit_layer_flops(n_img, width)
               + text_layers * vit_layer_flops(text_len, text_width) + vit_layer_flops(text_len, width))
    kd_logits = 2 * 2 * (batch + bank) * width  # image and text heads against batch + bank, per pair
    total = 3 * batch * (student + kd_logits)
    if "cached" not in variant:
        total += batch * (teacher_layers * vit_layer_flops(n_img, width) + patch_embed)
    return total
