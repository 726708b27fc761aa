"""The paper's image tower: fairseq's Data2Vec 2.0 image encoder, and a converter for its weights.

Data2Vec 2.0 (fairseq ``data2vec_multi``, IMAGE modality) is a ViT that differs from timm's
``vit_base_patch16_224`` in three ways, all taken from fairseq's code:

- its blocks are post-LN (``AltBlock`` with ``layer_norm_first: false``, modalities/modules.py):
  ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``, so there is no final norm;
- the position embedding is a fixed 2-D sin-cos table (MAE's ``get_2d_sincos_pos_embed``)
  added to the patch tokens BEFORE the CLS token (``extra_tokens``) is prepended
  (modalities/base.py ``contextualized_features``); the CLS token gets no position;
- a LayerNorm (``context_encoder.norm``) runs on [CLS; patches] before the first block.

Blocks can sit in two lists in fairseq: ``prenet_depth`` blocks in the modality's
``context_encoder`` and ``depth`` in the shared ``blocks``. They run one after the other, so
here they form one ``blocks`` list, prenet first. The released ViT-B checkpoint
(``base_imagenet.pt``) keeps all 12 in ``blocks`` (the thesis code loads it strictly into a
12-block timm ViT from ``blocks.*`` alone), so the paper's "first 6 blocks" are blocks 0-5.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from torch import nn

from ..files import atomic_path

FORMAT = "unialign.data2vec2"  # marker of a converted file


@dataclass(frozen=True)
class Data2Vec2Arch:
    """Shape of a Data2Vec 2.0 image encoder (defaults: the released ViT-B/16)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, values: dict[str, Any], what: str = "data2vec2 architecture") -> "Data2Vec2Arch":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{what}: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def sincos_positions(embed_dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed table, [1, grid*grid, embed_dim], patches in row-major order. Its first half
    encodes the patch's column, its second half its row; each half is [sin | cos] of the
    coordinate times 1/10000^(k/(embed_dim/4))."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos positions need embed_dim divisible by 4, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float().unsqueeze(0)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (fairseq's AltAttention), via SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide embed_dim={dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class PostNormBlock(nn.Module):
    """A post-LN Transformer block: the norms come after each residual sum."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class Data2Vec2Encoder(nn.Module):
    """Patch embedding, fixed positions, CLS, input LayerNorm, post-LN blocks; [B, 1+N, D] out."""

    def __init__(self, arch: Data2Vec2Arch) -> None:
        super().__init__()
        self.arch = arch
        self.embed_dim = arch.embed_dim
        self.patch_embed = PatchEmbed(arch.img_size, arch.patch_size, arch.in_chans, arch.embed_dim, bias=True)
        grid = arch.img_size // arch.patch_size
        # Fixed, as in fairseq (a parameter there with requires_grad=False): a buffer here.
        self.register_buffer("pos_embed", sincos_positions(arch.embed_dim, grid))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.embed_dim))
        self.norm_pre = nn.LayerNorm(arch.embed_dim, eps=arch.norm_eps)
        self.blocks = nn.ModuleList(PostNormBlock(arch.embed_dim, arch.num_heads, arch.mlp_ratio, arch.norm_eps)
                                    for _ in range(arch.depth))
        self._init_weights()

    def _init_weights(self) -> None:
        """fairseq's initialisation: BERT's normal(0, 0.02) for linear layers, Xavier for the patch
        projection, normal(0, 1) for the CLS token."""
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The input side: patches + positions, CLS, input LayerNorm."""
        x = self.patch_embed(pixels) + self.pos_embed
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm_pre(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixels)
        for block in self.blocks:
            x = block(x)
        return x


# ---------------------------------------------------------------------------------------
# fairseq checkpoint -> our state dict

_IMAGE = "modality_encoders.IMAGE."
_RENAMES = {
    _IMAGE + "local_encoder.proj.weight": "patch_embed.proj.weight",
    _IMAGE + "local_encoder.proj.bias": "patch_embed.proj.bias",
    _IMAGE + "extra_tokens": "cls_token",
    _IMAGE + "fixed_positional_encoder.positions": "pos_embed",
    _IMAGE + "context_encoder.norm.weight": "norm_pre.weight",
    _IMAGE + "context_encoder.norm.bias": "norm_pre.bias",
}
# Pretraining-only parts: none of them runs when the encoder extracts features.
DROPPED = {
    "_ema": "EMA teacher copy of the model (the source of data2vec's regression targets)",
    _IMAGE + "decoder.": "image decoder that predicts the teacher's targets for masked patches",
    "shared_decoder.": "decoder shared across modalities",
    "recon_proj.": "pixel-reconstruction head",
}
_PRENET_BLOCK = re.compile(re.escape(_IMAGE) + r"context_encoder\.blocks\.(\d+)\.(.+)")
_MAIN_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_BLOCK_PARAMS = {f"{m}.{p}" for m in ("attn.qkv", "attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2")
                 for p in ("weight", "bias")}


def _key_list(keys: list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _rename(state: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """Our names for the encoder's tensors, how many tensors each dropped part had, and the prenet depth."""
    renamed: dict[str, torch.Tensor] = {}
    dropped = dict.fromkeys(DROPPED, 0)
    prenet: dict[tuple[int, str], torch.Tensor] = {}
    main: dict[tuple[int, str], torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        drop = next((p for p in DROPPED if key.startswith(p)), None)
        pre, blk = _PRENET_BLOCK.fullmatch(key), _MAIN_BLOCK.fullmatch(key)
        if drop is not None:
            dropped[drop] += len(value) if isinstance(value, dict) else 1
        elif key in _RENAMES:
            renamed[_RENAMES[key]] = value
        elif pre and pre.group(2) in _BLOCK_PARAMS:
            prenet[int(pre.group(1)), pre.group(2)] = value
        elif blk and blk.group(2) in _BLOCK_PARAMS:
            main[int(blk.group(1)), blk.group(2)] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) for a Data2Vec 2.0 image encoder: {_key_list(unknown)}")
    depth_pre = max((i for i, _ in prenet), default=-1) + 1
    for (i, rest), value in prenet.items():
        renamed[f"blocks.{i}.{rest}"] = value
    for (j, rest), value in main.items():
        renamed[f"blocks.{depth_pre + j}.{rest}"] = value
    return renamed, {k: n for k, n in dropped.items() if n}, depth_pre


def _infer_arch(state: dict[str, torch.Tensor], cfg: dict[str, Any], num_heads: int | None,
                path: Path) -> Data2Vec2Arch:
    needed = ["patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"{path}: missing key(s) {_key_list(missing)} (after renaming fairseq's names)")
    embed_dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
    grid = math.isqrt(state["pos_embed"].shape[1])
    heads = num_heads or cfg.get("num_heads")
    if heads is None:
        raise ValueError(f"{path}: no cfg.model.num_heads in the checkpoint; give the number of heads")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))  # a gap shows as missing
    return Data2Vec2Arch(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=int(heads),
                         mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
                         norm_eps=float(cfg.get("norm_eps", 1e-6)))


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: holds Python objects besides tensors ({first}); if the file comes from a "
                         "source you trust, load it with trust_pickle (CLI: --trust-pickle)") from None


@dataclass
class Conversion:
    arch: Data2Vec2Arch
    prenet_depth: int  # of the `depth` blocks, how many sat in fairseq's context_encoder
    dropped: dict[str, int]  # dropped part -> number of tensors


def convert_fairseq_checkpoint(in_path: str | Path, out_path: str | Path, *, ema: bool = False,
                               num_heads: int | None = None, trust_pickle: bool = False) -> Conversion:
    """Write the image encoder of a fairseq Data2Vec 2.0 checkpoint as a file the data2vec2 backend
    loads. `ema`: take the EMA teacher's weights (``model._ema``) instead of the student's."""
    in_path, out_path = Path(in_path), Path(out_path)
    ckpt = _torch_load(in_path, trust_pickle)
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(isinstance(k, str) and k.startswith(_IMAGE) for k in state):
        raise ValueError(f"{in_path}: not a fairseq Data2Vec 2.0 image checkpoint (no 'model' dict with "
                         f"'{_IMAGE}*' keys)")
    cfg = ckpt.get("cfg") or {}  # a plain dict, or omegaconf's DictConfig when unpickled with trust
    model_cfg = dict(cfg.get("model") or {}) if isinstance(cfg, Mapping) else {}
    if model_cfg.get("layer_norm_first"):
        raise ValueError(f"{in_path}: cfg.model.layer_norm_first is true (pre-LN); only post-LN models are supported")
    if ema:
        if not isinstance(state.get("_ema"), dict):
            raise ValueError(f"{in_path}: has no EMA weights (model._ema)")
        state = {k: v for k, v in state["_ema"].items() if k != "__sq_mom"}
    renamed, dropped, prenet_depth = _rename(state, in_path)
    arch = _infer_arch(renamed, model_cfg, num_heads, in_path)
    expected = Data2Vec2Encoder(arch).state_dict()
    missing = sorted(set(expected) - set(renamed))
    if missing:
        raise ValueError(f"{in_path}: missing key(s) {_key_list(missing)} (our names)")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in renamed.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"{in_path}: unexpected shape(s): {_key_list(bad)}")
    out = {"format": FORMAT, "arch": asdict(arch), "source": in_path.name, "weights": "ema" if ema else "model",
           "state_dict": {k: v.detach().float().contiguous() for k, v in renamed.items()}}
    with atomic_path(out_path) as tmp:
        torch.save(out, tmp)
    return Conversion(arch, prenet_depth, dropped)


def load_converted(path: str | Path) -> tuple[Data2Vec2Arch, dict[str, torch.Tensor]]:
    """Architecture and weights from a file written by :func:`convert_fairseq_checkpoint`."""
    path = Path(path)
    ckpt = _torch_load(path, trust_pickle=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a converted data2vec2 checkpoint; write one from fairseq's file with "
                         "`unialign convert data2vec2 FAIRSEQ.pt OUT.pt`")
    return Data2Vec2Arch.from_dict(ckpt["arch"], str(path)), ckpt["state_dict"]
