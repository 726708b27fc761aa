"""The inference contract: what a checkpoint carries so that a model can be used without the
run's training configuration (open_clip's model + preprocess config, timm's ``pretrained_cfg``).

Every unialign checkpoint (``unialign train``'s last.ckpt / final.ckpt and exported models) stores
an :class:`InferenceConfig` under its ``"unialign"`` key; :func:`unialign.load` builds the model,
its preprocessing and its tokenizer from that alone: no data sources, no network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from .schema import IMAGENET_MEAN, IMAGENET_STD, Config, DataConfig, ModelConfig, _Strict


class Preprocess(_Strict):
    """How images are prepared for the model (the eval transform, and the base of fine-tuning's)."""

    image_size: int = Field(224, ge=8)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    @classmethod
    def from_data(cls, data: DataConfig) -> "Preprocess":
        return cls(image_size=data.image_size, mean=data.mean, std=data.std, interpolation=data.interpolation)

    def transform(self, train: bool = False, scale: tuple[float, float] = (0.9, 1.0)) -> Callable:
        """PIL image -> normalised tensor: eval (squash to a square), or train (random resized crop)."""
        from ..data.transforms import build_image_transform

        return build_image_transform(self.image_size, self.mean, self.std, train=train, scale=scale,
                                     interpolation=self.interpolation)


class InferenceConfig(_Strict):
    """Architecture, preprocessing and tokenizer of a trained model: everything but its weights.

    ``model`` is the run's model section (towers, kept layers, shared block(s), head, and the
    tokenizer's ``text.max_length``); the kept towers' shapes (``*_hf_config``) and the tokenizer's
    files are filled in from the built model when a checkpoint is written, so loading fetches
    nothing. Without them (a config not yet trained) the towers are built as configured.
    """

    model: ModelConfig
    itc_interm: bool = True  # the shared block's second logit scale (loss.itc_interm)
    kd_dim: int | None = Field(None, ge=1)  # width of the distillation head; None: no head
    preprocess: Preprocess = Field(default_factory=Preprocess)
    image_hf_config: dict[str, Any] | None = None  # kept image tower's shape (hf and data2vec2 backends)
    text_hf_config: dict[str, Any] | None = None  # kept text tower's shape
    tokenizer_files: dict[str, bytes] = Field(default_factory=dict)  # the tokenizer's save_pretrained files

    @classmethod
    def from_config(cls, cfg: Config, kd_dim: int | None = None) -> "InferenceConfig":
        """The inference part of a training run's config; `kd_dim` is the teacher's width (or None)."""
        return cls(model=cfg.model.model_copy(deep=True), itc_interm=cfg.loss.itc_interm, kd_dim=kd_dim,
                   preprocess=Preprocess.from_data(cfg.data))

    @property
    def max_length(self) -> int:
        """The tokenizer's maximum caption length in tokens."""
        return self.model.text.max_length

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain types only (dicts, lists, str, numbers, bytes): readable by ``torch.load(weights_only=True)``.
        The towers' shapes and the tokenizer files are kept as they are (already plain)."""
        raw = ("image_hf_config", "text_hf_config", "tokenizer_files")
        return {**self.model_dump(mode="json", exclude=set(raw)), **{key: getattr(self, key) for key in raw}}

    @classmethod
    def from_checkpoint(cls, entry: dict[str, Any]) -> "InferenceConfig":
        return cls.model_validate(entry)
