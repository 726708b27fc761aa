"""S-SMKE: two truncated unimodal towers under one shared Transformer block.

Image and text sequences pass through the shared block separately (no cross-attention),
so retrieval embeddings of each modality can be computed and indexed on their own.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention, LayerScale, Mlp
from torch import nn

from .itm import ITMHead
from .towers import freeze_tower, frozen_modules, layer_depth

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)
TEXT, IMAGE = 0, 1  # the token-type (modality) ids of `SMKE.forward_tokens`

# Parameter names that get no weight decay besides 1-d tensors (biases, norms, scales): embeddings.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "embeddings", "token_type", "reg_token")


def no_weight_decay_names(module: nn.Module | None, prefix: str = "") -> set[str]:
    """Names (with `prefix`) of the parameters the weight-decay rule exempts, judged on their shapes
    now: 1-d tensors (biases, norms, scales) and embeddings/tokens (`NO_DECAY_NAMES`)."""
    if module is None:
        return set()
    return {prefix + name for name, p in module.named_parameters()
            if p.ndim < 2 or any(key in name for key in NO_DECAY_NAMES)}


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, no_decay: Collection[str],
                 lr: float | None = None, lr_scales: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters in `named` (timm's `param_groups_weight_decay`): one
    per (weight decay or not, learning-rate multiplier) pair, decayed first, then by multiplier.

    Names in `no_decay` get no weight decay. It is a set decided beforehand (`SMKE.no_weight_decay`,
    `no_weight_decay_names`), not looked up on the shapes here: once FSDP has wrapped a model every
    parameter shows as a 1-d shard. With `lr`, each group has its rate, `lr` times its multiplier
    from `lr_scales` (1 for names not in it)."""
    scales = lr_scales or {}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in named:
        if param.requires_grad:
            groups.setdefault((name not in no_decay, scales.get(name, 1.0)), []).append(param)
    order = sorted(groups, key=lambda key: (not key[0], -key[1]))
    return [{"params": groups[key], "weight_decay": weight_decay if key[0] else 0.0,
             **({} if lr is None else {"lr": lr * key[1]})} for key in order]


class SharedBlock(nn.Module):
    """Pre-LN Transformer block that also exposes the CLS of its first MLP layer (pre-GELU).

    That hidden activation (`x_interm`) is a second contrastive feature in the author's code;
    timm's Block hides it, so the block is assembled here from timm's parts.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale_init: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim, init_values=layer_scale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, init_values=layer_scale_init)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`cls_only`: compute the CLS position alone, (B, 1, D), attending to every token as the full
        block does. The contrastive and KD losses read nothing else, and after attention each position
        is computed on its own: on 65 image tokens this is a fifth of the block's cost."""
        if cls_only:
            x = x[:, :1] + self.ls1(self._cls_attention(self.norm1(x), attn_mask))
        else:
            x = x + self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask))
        hidden = self.mlp.fc1(self.norm2(x))
        interm_cls = hidden[:, 0]
        out = self.mlp.fc2(self.mlp.norm(self.mlp.drop1(self.mlp.act(hidden))))
        return x + self.ls2(self.mlp.drop2(out)), interm_cls

    def _cls_attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """timm's `Attention.forward` for the first query only: keys and values of every token, the query
        of the first (the projection's rows are [q; k; v]). A test holds it to the full block."""
        attn = self.attn
        (b, n, _), dim, shape = x.shape, attn.attn_dim, (attn.num_heads, attn.head_dim)
        q_w, kv_w = attn.qkv.weight.split([dim, 2 * dim])
        q_b, kv_b = attn.qkv.bias.split([dim, 2 * dim]) if attn.qkv.bias is not None else (None, None)
        q = F.linear(x[:, :1], q_w, q_b).reshape(b, 1, *shape).transpose(1, 2)
        k, v = F.linear(x, kv_w, kv_b).reshape(b, n, 2, *shape).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=attn.attn_drop.p if self.training else 0.0)
        out = attn.norm(out.transpose(1, 2).reshape(b, 1, dim))
        if attn.gate is not None:
            out = out * attn.gate(x[:, :1]).sigmoid()
        return attn.proj_drop(attn.proj(out))


@dataclass
class Embeddings:
    """What the model gives for one modality: the first three taken from the CLS token."""

    embedding: torch.Tensor  # L2-normalised retrieval embedding `x`
    interm: torch.Tensor | None  # L2-normalised first-MLP-layer CLS `x_interm` (None without a shared block)
    kd: torch.Tensor | None  # KD-head output, compared with the teacher's target (None without a KD head)
    # The shared block's whole output sequence (B, L, D), CLS first: what the ITM head fuses (None in a
    # model without one: its last shared block computes the CLS alone).
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # text: (B, L) bool, True at real tokens; image: None (no padding)


class SMKE(nn.Module):
    """Image tower + text tower + token-type embedding + shared block(s) + KD head (when distilling)."""

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, shared_depth: int = 1, num_heads: int = 12,
                 mlp_ratio: float = 4.0, layer_scale_init: float = 0.2, token_type_scale_init: float = 1e-5,
                 kd_dim: int | None = None, interm_logit_scale: bool = True, text_pool: Literal["cls", "mean"] = "cls",
                 head: Literal["none", "linear"] = "none", itm: bool = False) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        width = int(image_tower.width)
        if width % num_heads:
            raise ValueError(f"model.shared.num_heads={num_heads} does not divide the shared width {width}")
        self.width = width
        # Towers of different widths meet in the image tower's width.
        self.text_proj = nn.Linear(text_tower.width, width) if text_tower.width != width else nn.Identity()
        self.token_type = nn.Embedding(2, width)  # 0 = text, 1 = image
        self.token_type_scale = LayerScale(width, init_values=token_type_scale_init)
        self.shared = nn.ModuleList(
            SharedBlock(width, num_heads, mlp_ratio, layer_scale_init) for _ in range(shared_depth)
        )
        self.text_pool = text_pool
        # CLIP-style projections of the CLS, one per modality (absent in the paper's model).
        self.image_head = nn.Linear(width, width) if head == "linear" else None
        self.text_head = nn.Linear(width, width) if head == "linear" else None
        # Only where distillation runs: an unused head has no gradient, which DDP refuses.
        self.kd_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, kd_dim)) if kd_dim is not None else None
        # Shape (1,), not (): FSDP cannot shard 0-d parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))
        self.logit_scale_interm = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT)) if interm_logit_scale else None
        # Built last, and only when asked for: a model without it draws the same initial weights
        # and has the same state-dict keys as before the head existed.
        self.itm_head = ITMHead(width, num_heads, mlp_ratio) if itm else None
        self._init_new_parts()
        # Decided here, on the real shapes: once FSDP has wrapped the model (use_orig_params),
        # every parameter shows as a 1-d view of its shard, and ndim would say "no decay" for all.
        self._no_decay = frozenset(no_weight_decay_names(self))

    def _init_new_parts(self) -> None:
        """normal(0, 0.02) for every new weight; the pretrained towers are left untouched."""
        new_parts = [self.text_proj, self.token_type, self.shared]
        new_parts += [m for m in (self.kd_head, self.image_head, self.text_head, self.itm_head) if m is not None]
        for part in new_parts:
            for module in part.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)

    def freeze(self, image_layers: int | Literal["all"], text_layers: int | Literal["all"]) -> None:
        """Fix the towers' embeddings and first blocks (model.*.freeze_layers); they stay in eval mode."""
        freeze_tower(self.image_tower, self.image_tower.num_blocks, image_layers)
        freeze_tower(self.text_tower, self.text_tower.num_blocks, text_layers)
        self._frozen = frozen_modules(self.image_tower) + frozen_modules(self.text_tower)

    def train(self, mode: bool = True) -> "SMKE":
        super().train(mode)
        for module in getattr(self, "_frozen", ()):
            module.eval()
        return self

    def lr_scales(self, tower_scale: float, layer_decay: float) -> dict[str, float]:
        """Learning-rate multiplier of every parameter: 1 for the new parts; in a tower of n blocks,
        tower_scale for its last block (and a final norm), layer_decay times less for each block
        further down, tower_scale * layer_decay**n for its embeddings (BEiT/timm-style decay)."""
        scales = {}
        for name, _ in self.named_parameters():
            scale = 1.0
            for prefix, tower in (("image_tower.", self.image_tower), ("text_tower.", self.text_tower)):
                if name.startswith(prefix):
                    n = tower.num_blocks
                    depth = min(layer_depth(name[len(prefix):], n), n)
                    scale = tower_scale * layer_decay ** (n - depth)
            scales[name] = scale
        return scales

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that get no weight decay (timm's `no_weight_decay`, with the 1-d ones
        included): biases, norms, scales, embeddings and tokens, judged on the shapes at construction."""
        return set(self._no_decay)

    def forward_tokens(self, tokens: torch.Tensor, modality: int, attn_mask: torch.Tensor | None = None,
                       cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shared block(s) over one modality's token sequence (the level of timm's `forward_features`).

        `tokens`: a tower's output at the shared width (text after `text_proj`), CLS first;
        `modality`: `TEXT` (0) or `IMAGE` (1); `attn_mask`: (B, 1, 1, L) bool, True where attended;
        `cls_only`: the last block computes the CLS position alone (see `SharedBlock.forward`).
        Returns the output sequence ((B, 1, D) with `cls_only`) and the CLS of the last block's first
        MLP layer (pre-GELU, un-normalised; None without a shared block)."""
        tokens = tokens + self.token_type_scale(self.token_type.weight[modality])
        interm = None
        for i, block in enumerate(self.shared):
            tokens, interm = block(tokens, attn_mask, cls_only=cls_only and i == len(self.shared) - 1)
        return tokens, interm

    def _embeddings(self, tokens: torch.Tensor, modality: int, attn_mask: torch.Tensor | None,
                    mask: torch.Tensor | None = None) -> Embeddings:
        # Only the ITM head reads the other positions of the output.
        whole = self.itm_head is not None
        tokens, interm = self.forward_tokens(tokens, modality, attn_mask, cls_only=not whole)
        cls = tokens[:, 0]
        head = self.image_head if modality == IMAGE else self.text_head
        return Embeddings(
            embedding=F.normalize(head(cls) if head is not None else cls, dim=-1),
            interm=F.normalize(interm, dim=-1) if interm is not None else None,
            kd=self.kd_head(cls) if self.kd_head is not None else None,
            tokens=tokens if whole else None,
            mask=mask,
        )

    def image_embeddings(self, pixels: torch.Tensor) -> Embeddings:
        return self.embed_image_tokens(self.image_tower(pixels))

    def embed_image_tokens(self, tokens: torch.Tensor) -> Embeddings:
        """The image side above the tower: `tokens` is the tower's output sequence (B, L, D), CLS first."""
        return self._embeddings(tokens, IMAGE, None)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Embeddings:
        return self.embed_text_tokens(self.text_tower(input_ids, attention_mask), attention_mask)

    def embed_text_tokens(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> Embeddings:
        """The text side above the tower: `tokens` is the tower's output sequence (B, L, D_text)."""
        tokens = self.text_proj(tokens)
        if self.text_pool == "mean":  # the CLS position carries the sentence's mean token
            weights = attention_mask[..., None].to(tokens.dtype)
            mean = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1)
            tokens = torch.cat([mean[:, None], tokens[:, 1:]], dim=1)
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): padding never attended
        return self._embeddings(tokens, TEXT, keep, attention_mask.bool())

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[Embeddings, Embeddings]:
        return self.image_embeddings(pixels), self.text_embeddings(input_ids, attention_mask)

    def itm_logits(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                   text_mask: torch.Tensor | None) -> torch.Tensor:
        """ITM logits (B, 2; index 1 = match) of B (image, caption) pairs, from the shared block's
        token outputs (`Embeddings.tokens` / `Embeddings.mask`). Needs a model built with model.itm."""
        if self.itm_head is None:
            raise ValueError("this model has no ITM head (it was built without model.itm: true)")
        return self.itm_head(image_tokens, text_tokens, text_mask)

    # open_clip-style API, so CLIP tooling can drive a unialign model.
    # Embeddings are always L2-normalised.
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_embeddings(pixels).embedding

    def encode_text(self, tokens: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Takes the tokenizer's output dict, or bare input ids (padding inferred from the pad id)."""
        if isinstance(tokens, torch.Tensor):
            pad_id = self.text_tower.model.config.pad_token_id or 0
            tokens = {"input_ids": tokens, "attention_mask": (tokens != pad_id).long()}
        return self.text_embeddings(tokens["input_ids"], tokens["attention_mask"]).embedding

    def scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Contrastive logit scales (exponentiated); `clamp_scales_` keeps them in [1, 100]."""
        interm = self.logit_scale_interm.exp() if self.logit_scale_interm is not None else None
        return self.logit_scale.exp(), interm

    @torch.no_grad()
    def clamp_scales_(self) -> None:
        """Clamp the raw scale parameters to [0, ln 100] (CLIP's cap), after each optimiser step.

        As the author's code does: a clamp inside the graph instead would give a parameter past the
        cap a zero gradient for good, so it could never come back down."""
        for p in (self.logit_scale, self.logit_scale_interm):
            if p is not None:
                p.clamp_(0, LOGIT_SCALE_MAX)
