"""The frozen self-supervised image teacher that gives distillation targets.

The paper's teacher is BEiTv2 ViT-B/16 pretrained self-supervised on ImageNet-1K, a file the
BEiT authors release (microsoft/unilm, beit2: ``beitv2_base_patch16_224_pt1k.pth``) and timm's
hub does not have. That file is the state dict of the pre-training model
(beit2/modeling_pretrain.py, ``VisionTransformerForMaskedImageModelingCLS``) under the key
``"model"``: no absolute position embedding, ONE relative position bias shared by all blocks
(``rel_pos_bias.relative_position_bias_table``), layer scale (``blocks.N.gamma_1/gamma_2``),
q/v biases, a token-level final ``norm``, plus what only pre-training uses: the masked-image
token (``mask_token``), the visual-token classifier (``lm_head``) and the CLS-pretraining head
(``cls_pt_layers``). timm's ``beitv2_*`` models default to the fine-tuned layout instead
(per-block bias tables, ``fc_norm`` after mean pooling), so this module reads such a file
itself: it builds the timm model in the file's layout, drops the pre-training-only keys by
name and refuses any other mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F
from timm.models import beit as timm_beit
from torch import nn

from ..config import DataConfig, TeacherConfig
from .towers import ImageTower, build_image_tower

log = logging.getLogger(__name__)

# Keys of a BEiT/BEiTv2 checkpoint that a teacher does not use, by name (any other unmatched key
# is an error). Pre-training only (beit2/modeling_pretrain.py): the token replacing masked
# patches, the visual-token classifier, and the CLS-pretraining head (late blocks run on the CLS
# and early-layer patch tokens, with its own norm/classifier when `shared_lm_head` is off).
PRETRAINING_ONLY_PREFIXES = ("lm_head.", "cls_pt_layers.", "cls_pt_norm.", "cls_pt_lm_head.")
PRETRAINING_ONLY_KEYS = ("mask_token",)
# A fine-tuned file's classifier: the teacher is built with num_classes=0, and timm's own loader
# drops it the same way when the class count changes.
CLASSIFIER_KEYS = ("head.weight", "head.bias")
# Top-level keys the BEiT authors' scripts store the weights under (utils.save_model writes
# "model"; their fine-tuning reads `--model_key model|module`).
WRAPPER_KEYS = ("model", "module")
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
_SHOWN = 5  # unmatched keys named in an error; the rest are counted


def is_timm_beit(name: str) -> bool:
    """Whether a timm model name (with or without a pretrained tag) is one of timm's BEiT models."""
    return timm.models.get_arch_name(name) in set(timm.list_models(module="beit"))


def _is_derived(key: str) -> bool:
    # relative_position_index is a buffer the BEiT code saves with the weights; it is a function
    # of the window size, which timm recomputes (a non-persistent buffer in recent timm, a saved
    # one in older releases), so the file's copy carries nothing and the model's own is kept.
    return key.endswith("relative_position_index")


def _is_unused(key: str) -> bool:
    return (key.startswith(PRETRAINING_ONLY_PREFIXES) or key in PRETRAINING_ONLY_KEYS or key in CLASSIFIER_KEYS
            or _is_derived(key))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a plain state dict or one under "model"/"module"."""
    try:
        # The authors' full training checkpoints also pickle their argparse options; allow that
        # class and nothing else beyond plain tensors and containers (the context manager is
        # torch >= 2.5; on 2.4 such a file gets the error below).
        allow = getattr(torch.serialization, "safe_globals", None)
        with allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        first_line = (str(err).splitlines() or [""])[0]
        raise ValueError(f"teacher.checkpoint {path} is not a readable PyTorch checkpoint "
                         f"({type(err).__name__}: {first_line})") from err
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"teacher.checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if others:  # e.g. a whole training checkpoint (DINO's student/teacher/optimizer, ...)
        raise ValueError(f"teacher.checkpoint {path} is not a state dict: {len(others)} non-tensor "
                         f"entries [{_listed(others)}]")
    return obj


def beit_layout_kwargs(state: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm `Beit` arguments that give the layout of the weights in `state`; `kwargs` (the config)
    win for any argument they set."""
    detected: dict[str, Any] = {
        "use_abs_pos_emb": "pos_embed" in state,
        "qkv_bias": "blocks.0.attn.q_bias" in state,
        # Layer scale exists iff init_values is truthy; its value is overwritten by the weights.
        # (0.0, not None, for none: timm.create_model drops None-valued kwargs.)
        "init_values": 0.1 if "blocks.0.gamma_1" in state else 0.0,
        # Pre-trained files have a token-level `norm` (applied before lm_head); fine-tuned ones
        # pool first and norm after (`fc_norm`), which timm builds for global_pool "avg" (its
        # default). Left at that, the file's `norm` has no place and `teacher.after_norm: true`
        # silently gets un-normed tokens. (Pooling itself is unused: the teacher takes the CLS.)
        "global_pool": "avg" if "fc_norm.weight" in state else "token",
    }
    if not {"use_rel_pos_bias", "use_shared_rel_pos_bias"} & kwargs.keys():
        # Given either, the config decides the bias layout (a shared table is then copied into
        # per-block ones if the model asks for those: `expand_shared_rel_pos_bias`).
        detected["use_shared_rel_pos_bias"] = SHARED_TABLE in state
        detected["use_rel_pos_bias"] = "blocks.0.attn.relative_position_bias_table" in state
    return {**detected, **kwargs}


def expand_shared_rel_pos_bias(state: dict[str, torch.Tensor], expected: set[str]) -> None:
    """Copy a shared relative position bias table into every block, in place, where the model has
    per-block tables and no shared one (what the BEiT authors' fine-tuning does with this file,
    beit2/run_class_finetuning.py). The result is the same function: the shared model adds that
    one bias to the attention logits of every block, the per-block model adds its block's copy."""
    per_block = sorted(k for k in expected
                       if k.startswith("blocks.") and k.endswith("attn.relative_position_bias_table"))
    if SHARED_TABLE not in state or SHARED_TABLE in expected or not per_block:
        return
    if any(k in state for k in per_block):
        return  # a file with both layouts is not expanded; the key check reports it
    table = state.pop(SHARED_TABLE)
    for key in per_block:
        state[key] = table.clone()


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_beit_state_dict(path: Path, name: str,
                         kwargs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights of a BEiT/BEiTv2 checkpoint file (self-supervised as released, or fine-tuned) for
    timm model `name`, and the timm kwargs that build it in the file's layout.

    Only the pre-training-only keys, a classifier and the saved position-index buffers are left
    out; every other key must match the model by name and shape, or a ValueError says which do not.
    """
    raw = read_state_dict(path)
    state = {k: v for k, v in raw.items() if not _is_unused(k)}
    dropped = len(raw) - len(state)
    build_kwargs = beit_layout_kwargs(state, kwargs)
    with torch.device("meta"):  # names and shapes only: no weights are allocated
        model = timm.create_model(name, pretrained=False, num_classes=0, **build_kwargs)
    expected = {k: v.shape for k, v in model.state_dict().items() if not _is_derived(k)}
    expand_shared_rel_pos_bias(state, set(expected))
    unexpected = sorted(k for k in state if k not in expected)
    missing = sorted(k for k in expected if k not in state)
    if unexpected or missing:
        found = [f"{len(keys)} {what} key(s) [{_listed(keys)}]"
                 for what, keys in (("unexpected", unexpected), ("missing", missing)) if keys]
        raise ValueError(f"teacher.checkpoint {path} is not a checkpoint of timm model {name!r} "
                         f"(BEiT layout): {', '.join(found)}")
    # timm's own filter for BEiT weights: resizes the patch embedding, position embedding and
    # bias tables when the teacher runs at another image size than the file was trained at.
    state = timm_beit.checkpoint_filter_fn(state, model)
    wrong = sorted(k for k, v in state.items() if v.shape != expected[k])
    if wrong:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}" for k in wrong]
        raise ValueError(f"teacher.checkpoint {path} does not fit timm model {name!r}: {len(wrong)} key(s) "
                         f"of another shape (file vs model) [{_listed(shapes)}]")
    log.info("teacher: loaded %s (%d tensors; %d pre-training-only/classifier/index entries not used)",
             path, len(state), dropped)
    return state, build_kwargs


class Teacher(nn.Module):
    """L2-normalised CLS of one block of a frozen ViT (paper: BEiTv2's last block, before the final norm).

    It is never trained: parameters do not require grad, `train()` keeps it in eval mode (no
    dropout, frozen norms), and the training module keeps it out of the optimizer and out
    of checkpoints, rebuilding it from the config instead.
    """

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        if cfg.block < -1:
            raise ValueError(f"teacher.block must be -1 (last) or a block index >= 0, got {cfg.block}")
        layers = None if cfg.block == -1 else cfg.block + 1  # blocks after the target one are never run
        if cfg.backend == "timm" and cfg.checkpoint is not None and is_timm_beit(cfg.name):
            # A BEiT file (e.g. the released self-supervised BEiTv2) is read here rather than by
            # timm, whose loader assumes the fine-tuned layout and drops keys with a warning.
            state, kwargs = load_beit_state_dict(cfg.checkpoint, cfg.name, cfg.kwargs)
            self.backbone: ImageTower = build_image_tower(cfg.backend, cfg.name, False, None, layers, kwargs,
                                                          keep_final_norm=cfg.after_norm)
            model = self.backbone.model
            # The truncated model holds a subset of the checked keys (kept blocks, and the final
            # norm only when used); it must hold no key of its own that the file lacks.
            own = model.state_dict()
            model.load_state_dict({k: own[k] if _is_derived(k) else state[k] for k in own}, strict=True)
        else:
            self.backbone = build_image_tower(cfg.backend, cfg.name, cfg.pretrained, cfg.checkpoint, layers,
                                              cfg.kwargs, keep_final_norm=cfg.after_norm)
        self.backbone.requires_grad_(False)
        self.color_jitter = cfg.color_jitter
        self.eval()
        self.width = self.backbone.width

    def train_transform(self, data: DataConfig, image_size: int) -> Callable:
        """The teacher's own augmentation of the image at `image_size` (`Config.teacher_image_size`),
        normalised with the teacher's statistics."""
        from ..data.transforms import build_image_transform

        stats = self.backbone.data_config
        return build_image_transform(image_size, stats.get("mean", data.mean), stats.get("std", data.std),
                                     train=True, scale=data.train_scale, interpolation=data.interpolation,
                                     hflip=data.hflip, color_jitter=self.color_jitter)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(pixels)[:, 0].float(), dim=-1)

    @torch.no_grad()
    def forward_from(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """`forward` from the backbone's tokens after its first `n` blocks (`forward_prefix`)."""
        return F.normalize(self.backbone.forward_suffix(tokens, n)[:, 0].float(), dim=-1)
