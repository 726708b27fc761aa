"""ALBEF's image-text matching (ITM) head (Li et al. 2021), shrunk to one fusion block.

S-SMKE's shared block sees each modality alone, so its embeddings can be indexed; whether a
caption matches an image is then judged only by a dot product. The ITM head lets the caption's
tokens look at the image's tokens (cross-attention) and classifies the pair as match / no match,
which is too slow for a whole gallery but good for re-ranking the dual encoder's top K
(`evaluation/rerank.py`) and, as a loss, for sharpening the shared representation
(`losses/itm.py`).

Inputs are the shared block's output sequences (`Embeddings.tokens` of `SMKE.image_embeddings`
and `SMKE.text_embeddings`), with the caption's padding mask (`Embeddings.mask`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of queries `x` to keys/values `context` (timm's Attention has only
    self-attention: one qkv projection of the same sequence)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class FusionBlock(nn.Module):
    """Pre-LN block of ALBEF's fusion encoder: masked self-attention over the text, cross-attention
    from the text to the image, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm_text = nn.LayerNorm(dim, eps=1e-6)
        self.norm_image = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, text: torch.Tensor, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`keep`: (B, 1, 1, L) bool, True at the caption's real tokens (padding is never attended)."""
        text = text + self.self_attn(self.norm1(text), attn_mask=keep)
        text = text + self.cross_attn(self.norm_text(text), self.norm_image(image))
        return text + self.mlp(self.norm2(text))


class ITMHead(nn.Module):
    """(image tokens, text tokens, text mask) -> (B, 2) logits, index 1 = "the caption matches"."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.block = FusionBlock(dim, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.classifier = nn.Linear(dim, 2)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`image_tokens` (B, T, D), `text_tokens` (B, L, D), `text_mask` (B, L), nonzero at real
        tokens (the tokenizer's attention mask; None: no padding). The pair's logits come from the
        text CLS after fusion, which only sees unpadded text tokens and the image."""
        if image_tokens.shape[0] != text_tokens.shape[0]:
            raise ValueError(f"ITM needs one image per caption, got {image_tokens.shape[0]} image and "
                             f"{text_tokens.shape[0]} text sequences")
        if text_mask is None:
            text_mask = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=text_tokens.device)
        keep = text_mask.bool()[:, None, None, :]
        fused = self.block(text_tokens, image_tokens.to(text_tokens.dtype), keep)
        return self.classifier(self.norm(fused[:, 0]))


def match_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(match) of ITM logits (B, 2): the score re-ranking orders candidates by."""
    return logits.float().softmax(dim=-1)[:, 1]
