"""Pretrained unimodal towers, cut down to their first layers.

The method keeps only the lower blocks of a self-supervised image model and of BERT:
they hold most of the transferable features at a fraction of the compute. Truncation
reuses the pretrained block modules themselves, so kept weights are exactly the
pretrained ones. Image backends are looked up in a registry (timm, Hugging Face, and
fairseq's Data2Vec 2.0 in unialign's own implementation).
"""

from __future__ import annotations

import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Literal

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from .data2vec2 import Data2Vec2Arch, Data2Vec2Encoder, load_converted
from .hf_loading import quiet_local_load, text_model_from_config, text_model_from_pretrained


def select_layers(total: int, layers: int | list[int], what: str) -> list[int]:
    """Indices of the blocks to keep: the first N, or an explicit list (e.g. every second)."""
    indices = list(range(layers)) if isinstance(layers, int) else list(layers)
    bad = [i for i in indices if not 0 <= i < total]
    if bad:
        raise ValueError(f"{what} has {total} blocks; cannot keep block(s) {bad}")
    return indices


# A block's parameters in timm (`blocks.3.`) and transformers (`encoder.layer.3.`, `layers.3.`) models.
_BLOCK_NAME = re.compile(r"(?:^|\.)(?:blocks|layer|layers)\.(\d+)\.")


def layer_depth(name: str, n_blocks: int) -> int:
    """Depth of a tower parameter, for freezing and layer-wise learning-rate decay: 0 for the
    input side (patch/word/position embeddings, CLS and register tokens), i + 1 for kept block
    i, n_blocks + 1 for what comes after the blocks (a final norm)."""
    match = _BLOCK_NAME.search(name)
    if match:
        return int(match.group(1)) + 1
    input_side = ("embed", "cls_token", "reg_token", "norm_pre")
    return 0 if any(key in name for key in input_side) else n_blocks + 1


def freeze_tower(tower: nn.Module, n_blocks: int, layers: int | Literal["all"]) -> None:
    """Stop training the input side and the first `layers` blocks of a tower (all of it: "all";
    nothing at 0)."""
    if layers == 0:
        return
    for name, param in tower.named_parameters():
        if layers == "all" or layer_depth(name, n_blocks) <= layers:
            param.requires_grad_(False)


def frozen_count(layers: int | Literal["all"], n_blocks: int) -> int:
    """How many of `n_blocks` kept blocks `freeze_layers: layers` freezes (with the input side)."""
    return n_blocks if layers == "all" else min(layers, n_blocks)


def prefix_tensors(tower: nn.Module, n_blocks: int, n: int) -> list[torch.Tensor]:
    """The weights and buffers of a tower's input side and first `n` blocks, in state-dict order."""
    return [t for name, t in tower.state_dict().items() if layer_depth(name, n_blocks) <= n]


def frozen_blocks(tower: nn.Module, n_blocks: int) -> int:
    """How many of a tower's first blocks are frozen with its input side (what `freeze_tower` left
    without gradient): 0 to n_blocks."""
    trainable = [layer_depth(name, n_blocks) for name, p in tower.named_parameters() if p.requires_grad]
    return max(0, min(n_blocks, min(trainable, default=n_blocks + 1) - 1))


def frozen_modules(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules whose parameters are all frozen: they run in eval mode, so a
    frozen layer is a fixed function (no dropout) and its outputs could be computed once."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [module]
    return [m for child in module.children() for m in frozen_modules(child)]


def hf_config_from_dict(config: dict[str, Any]) -> PretrainedConfig:
    """Rebuild a transformers config saved in a unialign checkpoint, offline."""
    config = dict(config)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def hf_layer_list(model: nn.Module) -> tuple[nn.Module, str] | None:
    """Where a transformers model keeps its blocks (the layout differs across models and versions)."""
    for path in ("encoder.layer", "encoder.layers", "layers"):
        *parents, attr = path.split(".")
        parent: nn.Module | None = model
        for name in parents:
            parent = getattr(parent, name, None)
        if isinstance(getattr(parent, attr, None), nn.ModuleList):
            return parent, attr
    return None


def hf_split_error(model: nn.Module) -> str | None:
    """Why a transformers image model cannot be run in two parts, split after a block (None: it can).

    Models whose forward is embeddings -> layers (hidden states only) -> layernorm can; BEiT-like
    ones pass relative position biases between their layers."""
    kind = model.config.model_type
    return None if kind in ("dinov2", "vit") else f"Hugging Face {kind!r} towers cannot be split after a block"


def truncate_hf_layers(model: nn.Module, layers: int | list[int], what: str) -> None:
    """Keep the chosen blocks of a transformers model, in place, and record it in its config."""
    found = hf_layer_list(model)
    if found is None:
        raise ValueError(f"{what} has no list of Transformer layers to truncate")
    parent, attr = found
    blocks = getattr(parent, attr)
    keep = select_layers(len(blocks), layers, what)
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in keep]))
    config = model.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "stage_names", None), list) and len(config.stage_names) == len(blocks) + 1:
        # Backbone-capable configs (DINOv2, BEiT, ViTDet...) name one stage per layer and point
        # `out_features` at the last one; left as is, the saved config names a stage that no
        # longer exists and transformers refuses to rebuild the model from it.
        config.stage_names = config.stage_names[:1] + [f"stage{i}" for i in range(1, len(keep) + 1)]
        config.set_output_features_output_indices(None, None)


class ImageTower(nn.Module):
    """A ViT-like image model returning its token sequence (CLS first) after the kept blocks.

    `hf_config` is the kept tower's architecture as a plain dict, for backends whose shape the
    run config does not give (Hugging Face backbones, data2vec2): unialign checkpoints store it
    so a model can be rebuilt without the hub or the original weights file.
    """

    width: int
    num_blocks: int
    hf_config: dict[str, Any] | None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    # The same forward in two parts, split after kept block n: the input side and the first n blocks
    # (what `freeze_layers: n` fixes, so their output can be computed once per image and reused),
    # then the rest. forward(p) == forward_suffix(forward_prefix(p, n), n) for every 0 <= n <= num_blocks.
    def split_error(self) -> str | None:
        """Why this tower cannot be split after a block (None: it can)."""
        return f"{type(self).__name__} cannot be split after a block"

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(self.split_error())

    def _blocks(self) -> list[nn.Module]:
        raise NotImplementedError(self.split_error())

    def _final(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def forward_prefix(self, pixels: torch.Tensor, n: int) -> torch.Tensor:
        tokens = self._embed(pixels)
        for block in self._blocks()[:n]:
            tokens = block_output(block(tokens))
        return tokens

    def forward_suffix(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        for block in self._blocks()[n:]:
            tokens = block_output(block(tokens))
        return self._final(tokens)


def block_output(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """transformers' layers return a tensor or (depending on the version) a tuple led by it."""
    return out[0] if isinstance(out, tuple) else out


class TimmImageTower(ImageTower):
    def __init__(self, name: str, pretrained: bool, checkpoint: Path | None, layers: int | list[int] | None,
                 kwargs: dict[str, Any], keep_final_norm: bool = False) -> None:
        super().__init__()
        create_kwargs: dict[str, Any] = dict(kwargs)
        if checkpoint is not None:
            create_kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint))
        model = timm.create_model(name, pretrained=pretrained or checkpoint is not None, num_classes=0,
                                  **create_kwargs)
        if not isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
            raise ValueError(f"timm model {name!r} has no `blocks` list; only ViT-like models can be truncated")
        if layers is not None:
            keep = select_layers(len(model.blocks), layers, f"timm model {name!r}")
            model.blocks = nn.Sequential(*[model.blocks[i] for i in keep])
        else:
            model.blocks = nn.Sequential(*model.blocks)
        if not keep_final_norm:
            model.norm = nn.Identity()
        self.model = model
        self.width = int(model.embed_dim)
        self.num_blocks = len(model.blocks)
        self.hf_config = None
        self.data_config = timm.data.resolve_data_config({}, model=model)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixels)

    def split_error(self) -> str | None:
        if isinstance(self.model, timm.models.vision_transformer.VisionTransformer):
            return None
        return f"only timm's VisionTransformer can be split after a block, not {type(self.model).__name__}"

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.model  # VisionTransformer.forward_features up to its blocks
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixels))))

    def _blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def _final(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.norm(tokens)


class HFImageTower(ImageTower):
    """Hugging Face ViT/DINOv2/BEiT/Data2VecVision models."""

    def __init__(self, name: str, pretrained: bool, checkpoint: Path | None, layers: int | list[int] | None,
                 kwargs: dict[str, Any], keep_final_norm: bool = False,
                 hf_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        if checkpoint is not None:
            raise ValueError("Hugging Face image towers load from `name` (a hub name or local directory), "
                             f"not from a checkpoint file ({checkpoint})")
        if hf_config is not None:
            model = AutoModel.from_config(hf_config_from_dict(hf_config))
        elif pretrained:
            with quiet_local_load(name):
                model = AutoModel.from_pretrained(name, **kwargs)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(name, **kwargs))
        if layers is not None and hf_config is None:
            truncate_hf_layers(model, layers, f"Hugging Face model {name!r}")
        if not keep_final_norm and hasattr(model, "layernorm"):
            model.layernorm = nn.Identity()
        if hasattr(model, "pooler"):
            model.pooler = None
        mask_token = getattr(getattr(model, "embeddings", None), "mask_token", None)
        if mask_token is not None:
            # DINOv2/BEiT's masked-image-modelling token is never used here; frozen, it gets no
            # gradient and none is expected (DDP stops on trainable parameters without one).
            mask_token.requires_grad_(False)
        self.model = model
        self.width = int(model.config.hidden_size)
        self.num_blocks = int(model.config.num_hidden_layers)
        self.hf_config = model.config.to_dict()
        self.data_config = {}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state

    def split_error(self) -> str | None:
        return hf_split_error(self.model)

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(pixels)

    def _blocks(self) -> list[nn.Module]:
        found = hf_layer_list(self.model)
        assert found is not None
        return list(getattr(*found))

    def _final(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.layernorm(tokens)


class Data2Vec2ImageTower(ImageTower):
    """`model.image.backend: data2vec2`: weights from a converted file (`checkpoint`), shape from
    that file or, for random weights, from `kwargs` (fields of :class:`Data2Vec2Arch`).

    `hf_config` carries the kept tower's architecture in unialign checkpoints (rebuilt as is)."""

    def __init__(self, name: str, pretrained: bool, checkpoint: Path | None, layers: int | list[int] | None,
                 kwargs: dict[str, Any], keep_final_norm: bool = False,
                 hf_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        state: dict[str, torch.Tensor] | None = None
        if hf_config is not None:
            arch, layers = Data2Vec2Arch.from_dict(hf_config), None
        elif checkpoint is not None:
            arch, state = load_converted(checkpoint)
            wanted = Data2Vec2Arch.from_dict(kwargs, "data2vec2 kwargs")
            clash = {k: v for k, v in kwargs.items() if getattr(arch, k) != getattr(wanted, k)}
            if clash:
                raise ValueError(f"data2vec2 kwargs {clash} disagree with {checkpoint} ({asdict(arch)})")
        elif pretrained:
            raise ValueError("the data2vec2 image backend needs `checkpoint` when pretrained is true: a file "
                             "written by `unialign convert data2vec2 FAIRSEQ.pt OUT.pt`")
        else:
            arch = Data2Vec2Arch.from_dict(kwargs, "data2vec2 kwargs")
        model = Data2Vec2Encoder(arch)
        if state is not None:
            model.load_state_dict(state)
        if layers is not None:
            keep = select_layers(len(model.blocks), layers, "data2vec2 image model")
            model.blocks = nn.ModuleList(model.blocks[i] for i in keep)
        self.model = model
        self.width = arch.embed_dim
        self.num_blocks = len(model.blocks)
        self.hf_config = asdict(replace(arch, depth=self.num_blocks))
        self.data_config = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
                            "input_size": (arch.in_chans, arch.img_size, arch.img_size), "interpolation": "bicubic"}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)

    def split_error(self) -> str | None:
        return None

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.embed(pixels)

    def _blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)


IMAGE_BACKENDS: dict[str, Callable[..., ImageTower]] = {"timm": TimmImageTower, "hf": HFImageTower,
                                                        "data2vec2": Data2Vec2ImageTower}


def build_image_tower(backend: str, name: str, pretrained: bool, checkpoint: Path | None = None,
                      layers: int | list[int] | None = None, kwargs: dict[str, Any] | None = None,
                      keep_final_norm: bool = False, hf_config: dict[str, Any] | None = None) -> ImageTower:
    if backend not in IMAGE_BACKENDS:
        raise ValueError(f"unknown image backend {backend!r}; choose one of {sorted(IMAGE_BACKENDS)}")
    extra = {"hf_config": hf_config} if backend in ("hf", "data2vec2") else {}
    return IMAGE_BACKENDS[backend](name, pretrained, checkpoint, layers, kwargs or {}, keep_final_norm, **extra)


class TextTower(nn.Module):
    """A BERT-like encoder cut to its first N layers, pooler removed (the CLS token is used raw)."""

    def __init__(self, name: str, pretrained: bool, layers: int, hf_config: dict[str, Any] | None = None,
                 dropout: float | None = None) -> None:
        super().__init__()
        # BERT-style configs name their two dropouts so; `None` keeps the model's own.
        overrides = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        if hf_config is not None:
            model = text_model_from_config(hf_config_from_dict({**hf_config, **overrides}))
        elif pretrained:
            model = text_model_from_pretrained(name, **overrides)
        else:
            config = AutoConfig.from_pretrained(name)
            config.update(overrides)
            model = text_model_from_config(config)
        if hf_config is None:
            truncate_hf_layers(model, layers, f"text model {name!r}")
        self.model = model
        self.width = int(model.config.hidden_size)
        self.num_blocks = int(model.config.num_hidden_layers)
        self.hf_config = model.config.to_dict()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The token sequence (CLS first) after the kept layers. `token_type_ids`: BERT's segment ids,
        for sentence pairs (GLUE); left out, every token is in segment 0."""
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=self._mask(attention_mask), **segments).last_hidden_state

    def _mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        # A ready 4-D mask: given a 2-D one, transformers reads it on the host to see whether it
        # can be dropped (a device sync every step and a graph break under torch.compile).
        if self.model.config._attn_implementation == "sdpa":
            return attention_mask.bool()[:, None, None, :]
        return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    # forward split after kept layer n, as ImageTower's (BERT-like encoders: embeddings -> layers)
    def split_error(self) -> str | None:
        kind = self.model.config.model_type
        return None if kind == "bert" else f"{kind!r} text towers cannot be split after a layer (only BERT)"

    def forward_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
        return self._layers(self.model.embeddings(input_ids=input_ids), attention_mask, slice(0, n))

    def forward_suffix(self, tokens: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
        return self._layers(tokens, attention_mask, slice(n, None))

    def _layers(self, tokens: torch.Tensor, attention_mask: torch.Tensor, which: slice) -> torch.Tensor:
        found = hf_layer_list(self.model)
        assert found is not None
        mask = self._mask(attention_mask)
        for layer in list(getattr(*found))[which]:
            tokens = block_output(layer(tokens, mask))
        return tokens
