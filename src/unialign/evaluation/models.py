"""One evaluation harness for several kinds of image-text model.

Every evaluation (retrieval, zero-shot, linear probe) talks to an :class:`EvalModel`, so a
unialign checkpoint and the baselines it is compared with (open_clip, Hugging Face CLIP)
are measured by the same code, on the same images, with the same metrics. A model is
named by a spec string whose prefix picks the adapter:

- ``/path/to/final.ckpt`` (no prefix, or ``unialign:PATH``): a unialign checkpoint;
- ``openclip:ARCH`` or ``openclip:ARCH/PRETRAINED``: an open_clip model; PRETRAINED is an
  open_clip tag (``openai``, ``laion2b_s34b_b79k``) or a local weights file; ARCH may be
  ``local-dir:/path`` (a folder with ``open_clip_config.json`` + weights);
- ``hf:NAME_OR_PATH``: a transformers model with ``get_image_features`` /
  ``get_text_features`` (CLIPModel, SiglipModel, ...), its image processor and tokenizer.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .encode import PixelMemo, encode_images, encode_texts
from .specs import EvalError

log = logging.getLogger(__name__)


class EvalModel(ABC):
    """An image-text model as evaluations see it: L2-normalised embeddings and a preprocess.

    Adapters implement `encode_image` (pixel batch), `tokenize` and `encode_text`; the file
    and caption helpers come from `evaluation.encode` (progress bars, unreadable files
    skipped and counted), so every model kind gets the same batching and skip rules.
    """

    name: str  # the spec it was loaded from: results carry it as `model`
    preprocess: Callable[[Image.Image], torch.Tensor]  # PIL image -> (3, H, W) tensor
    width: int  # embedding size
    device: torch.device

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, width), L2-normalised."""

    @abstractmethod
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts -> the tensors `encode_text` takes (a dict, the shape `encode_texts` moves to the device)."""

    @abstractmethod
    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenized texts -> (B, width), L2-normalised."""

    @property
    def logit_scale(self) -> float:
        """The inverse temperature the model's contrastive loss trained at (CLIP's exp(logit_scale));
        unialign, open_clip and transformers' dual encoders all keep it as `logit_scale`, a log."""
        scale = getattr(getattr(self, "model", None), "logit_scale", None)
        if not isinstance(scale, torch.Tensor):
            raise EvalError(f"model {self.name!r} has no logit_scale to take the query bank's temperature from")
        return float(scale.detach().float().exp().reshape(-1)[0])

    def encode_images(self, paths: Sequence[str], batch_size: int = 64, num_workers: int = 0,
                      progress: bool = True, memo: PixelMemo | None = None
                      ) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
        """Embeddings of the readable files, their indices into `paths`, and the (path, reason) skipped;
        `memo` keeps preprocessed pixels for the next model with the same preprocessing."""
        return encode_images(self, self.preprocess, paths, batch_size, num_workers, self.device,  # type: ignore[arg-type]
                             progress, memo)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = True) -> torch.Tensor:
        return encode_texts(self, self.tokenize, texts, batch_size, self.device, progress)  # type: ignore[arg-type]


class UnialignEvalModel(EvalModel):
    """A unialign inference checkpoint (``unialign.load``)."""

    def __init__(self, checkpoint: str | Path, device: torch.device, name: str | None = None) -> None:
        from ..model.factory import load

        self.model, self.preprocess, self.tokenizer = load(checkpoint, device=device)
        self.name = name or str(checkpoint)
        self.width = self.model.width
        self.device = device

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts)

    @torch.no_grad()
    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens)


class OpenClipEvalModel(EvalModel):
    """An open_clip model; weights from an open_clip tag, a local file, or none (random init)."""

    def __init__(self, arch: str, pretrained: str | None, device: torch.device, name: str) -> None:
        try:
            import open_clip
        except ImportError:
            raise EvalError(f"model {name!r} needs open_clip: pip install 'unialign[eval]' "
                            "(or pip install open-clip-torch)") from None
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
        except RuntimeError as err:  # open_clip reports unknown architectures / tags as RuntimeError
            raise EvalError(f"model {name!r}: open_clip cannot create {arch!r} with pretrained={pretrained!r} "
                            f"({err})") from None
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.name = name
        self.width = int(model.visual.output_dim)
        self.device = device

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(texts)}

    @torch.no_grad()
    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens["input_ids"]).float(), dim=-1)


class _HFImagePreprocess:
    """PIL image -> pixel tensor via a transformers image processor (a class: DataLoader workers pickle it)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def _features(output: Any) -> torch.Tensor:
    """transformers 4.x returns the projected features; 5.x a model output whose pooler_output holds them."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise EvalError(f"get_*_features returned {type(output).__name__} without a pooler_output tensor")


class HFEvalModel(EvalModel):
    """A transformers dual encoder (CLIPModel and friends) from the hub or a local folder."""

    def __init__(self, name_or_path: str, device: torch.device, name: str) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        try:
            model = AutoModel.from_pretrained(name_or_path)
            processor = AutoImageProcessor.from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:  # missing files / a folder that is not a transformers model
            raise EvalError(f"model {name!r}: cannot load {name_or_path!r} with transformers ({err})") from None
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise EvalError(f"model {name!r}: {type(model).__name__} has no get_image_features/get_text_features; "
                            "only dual encoders (CLIPModel, SiglipModel, ...) can be evaluated")
        self.model = model.to(device).eval()
        self.preprocess = _HFImagePreprocess(processor)
        self.tokenizer = tokenizer
        text_config = getattr(model.config, "text_config", model.config)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 77))
        # SigLIP was trained on texts padded to full length and pools the last token: pad the same way
        self.padding: bool | str = "max_length" if "siglip" in str(model.config.model_type) else True
        self.name = name
        self.width = int(getattr(model.config, "projection_dim", 0) or text_config.hidden_size)
        self.device = device

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(list(texts), padding=self.padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: out[k] for k in ("input_ids", "attention_mask") if k in out}

    @torch.no_grad()
    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)


def _load_unialign(rest: str, device: torch.device, spec: str) -> EvalModel:
    if not Path(rest).is_file():
        raise EvalError(f"model {spec!r}: checkpoint {rest} does not exist "
                        "(other model kinds: openclip:ARCH/PRETRAINED, hf:NAME_OR_PATH)")
    return UnialignEvalModel(rest, device, name=spec)


def _load_openclip(rest: str, device: torch.device, spec: str) -> EvalModel:
    """ARCH[/PRETRAINED]: architecture names hold no '/', so the first one ends ARCH (a file path may follow)."""
    if not rest:
        raise EvalError(f"model {spec!r}: expected openclip:ARCH or openclip:ARCH/PRETRAINED")
    if rest.startswith(("local-dir:", "hf-hub:")):  # open_clip's own schemas carry their weights
        return OpenClipEvalModel(rest, None, device, spec)
    arch, _, pretrained = rest.partition("/")
    return OpenClipEvalModel(arch, pretrained or None, device, spec)


def _load_hf(rest: str, device: torch.device, spec: str) -> EvalModel:
    if not rest:
        raise EvalError(f"model {spec!r}: expected hf:NAME_OR_PATH")
    return HFEvalModel(rest, device, spec)


# prefix -> loader(rest of the spec, device, full spec); "" is the default (a unialign checkpoint)
MODEL_KINDS: dict[str, Callable[[str, torch.device, str], EvalModel]] = {
    "unialign": _load_unialign,
    "openclip": _load_openclip,
    "hf": _load_hf,
}


def load_eval_model(spec: str | Path, device: str | torch.device | None = None) -> EvalModel:
    """The adapter for `spec` (see the module doc); a bare path is a unialign checkpoint."""
    from .run import default_device

    device = torch.device(device or default_device())
    spec = str(spec)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in MODEL_KINDS:
        return MODEL_KINDS[prefix](rest, device, spec)
    return _load_unialign(spec, device, spec)

