"""One place that turns a config (or a checkpoint) into a model, its transform and tokenizer.

A checkpoint carries its inference contract (:class:`~unialign.config.InferenceConfig`: architecture,
preprocessing, tokenizer), so :func:`load` needs neither the training config nor the network."""

from __future__ import annotations

import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import ValidationError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..config import Config, InferenceConfig
from ..files import torch_save_atomic
from .smke import SMKE
from .towers import TextTower, build_image_tower


class TextTokenizer:
    """Callable tokenizer with the model's max length baked in (open_clip's `tokenizer(texts)` shape)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def _inference(spec: Config | InferenceConfig, kd_dim: int | None) -> InferenceConfig:
    return spec if isinstance(spec, InferenceConfig) else InferenceConfig.from_config(spec, kd_dim)


def create_student(spec: Config | InferenceConfig, kd_dim: int | None = None) -> SMKE:
    """Build the trainable model from a run's config and the teacher's width `kd_dim` (None: no
    distillation head), or from an :class:`InferenceConfig` (which carries its own `kd_dim`).
    Pretrained tower weights are fetched as the model section says."""
    return _build(_inference(spec, kd_dim), pretrained=True)


def _build(card: InferenceConfig, pretrained: bool) -> SMKE:
    """The model `card` describes; without `pretrained` the towers are built from the card's stored
    shapes (or, for timm, the name and kwargs) and no weights are fetched."""
    m = card.model
    image = build_image_tower(m.image.backend, m.image.name, pretrained and m.image.pretrained,
                              m.image.checkpoint if pretrained else None, m.image.layers, m.image.kwargs,
                              hf_config=None if pretrained else card.image_hf_config)
    text = TextTower(m.text.name, pretrained and m.text.pretrained, m.text.layers,
                     hf_config=None if pretrained else card.text_hf_config, dropout=m.text.dropout)
    model = SMKE(image, text, shared_depth=m.shared.depth, num_heads=m.shared.num_heads,
                 mlp_ratio=m.shared.mlp_ratio, layer_scale_init=m.shared.layer_scale_init,
                 token_type_scale_init=m.shared.token_type_scale_init, kd_dim=card.kd_dim,
                 interm_logit_scale=card.itc_interm, text_pool=m.text.pool, head=m.head, itm=m.itm)
    model.freeze(m.image.freeze_layers, m.text.freeze_layers)
    return model


def inference_config(model: SMKE, spec: Config | InferenceConfig, tokenizer: PreTrainedTokenizerBase,
                     kd_dim: int | None = None) -> InferenceConfig:
    """The inference contract a checkpoint of `model` carries: `spec`'s architecture and
    preprocessing (a run config with the teacher's width `kd_dim`, or an InferenceConfig),
    completed with the built towers' shapes and the tokenizer's files."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    return _inference(spec, kd_dim).model_copy(update={
        "image_hf_config": model.image_tower.hf_config,
        "text_hf_config": model.text_tower.hf_config,
        "tokenizer_files": files,
    })


def tokenizer_from_files(files: dict[str, bytes]) -> PreTrainedTokenizerBase:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)


def create_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(cfg.model.text.name)


def eval_transform(cfg: Config) -> Callable:
    """The eval transform of a run's data section (what :func:`load` gives for its checkpoints)."""
    from ..config import Preprocess

    return Preprocess.from_data(cfg.data).transform()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (empty, truncated, not a checkpoint); the message is
    one line naming the file and the cause."""


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive (since PyTorch 1.6)


def checkpoint_damage(path: str | Path) -> str | None:
    """Why `path` cannot be a readable ``torch.save`` file, or None when it looks whole.

    Cheap (the first bytes and the zip directory at the end, no tensor data), so a resume can
    check a multi-gigabyte checkpoint before it starts building the run. A file in PyTorch's
    legacy (pre-zip) format is not judged here: only loading it tells."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes; a write or copy that never finished?)"
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):  # the zip directory sits at the end: a cut file has none
            return f"the file is truncated ({size} bytes, its end is missing; an interrupted write or copy?)"
        return None
    if head[:1] == b"\x80":  # a legacy pickle-format torch.save file
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"not a PyTorch checkpoint (starts with bytes {head[:8]!r})"
    return f"not a PyTorch checkpoint but a text file (starts with {text.splitlines()[0][:40]!r})" if text.strip() \
        else "not a PyTorch checkpoint (it starts with blank text)"


def unreadable_checkpoint(path: str | Path, err: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint that ``torch.load`` failed on with `err`."""
    cause = checkpoint_damage(path)
    if cause is None:
        first = (str(err).strip().splitlines() or [""])[0]
        cause = f"damaged or not a PyTorch checkpoint ({type(err).__name__}: {first[:200]})"
    return CheckpointError(f"cannot read checkpoint {path}: {cause}")


# What torch.load raises on a damaged file: EOFError (empty), KeyError / IndexError /
# UnpicklingError (text or garbage read as a legacy pickle), RuntimeError (a cut zip archive).
LOAD_ERRORS = (EOFError, KeyError, IndexError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile)


def load_checkpoint_file(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, map_location="cpu", **kwargs)`` with a missing or damaged file reported in
    one line (:class:`FileNotFoundError` / :class:`CheckpointError`) instead of a deep traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    cause = checkpoint_damage(path)
    if cause is not None:
        raise CheckpointError(f"cannot read checkpoint {path}: {cause}")
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except LOAD_ERRORS as err:
        raise unreadable_checkpoint(path, err) from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    ckpt = load_checkpoint_file(path, weights_only=True)  # no code runs from a checkpoint
    if not isinstance(ckpt, dict) or "unialign" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a unialign training checkpoint (no 'unialign' metadata)")
    return ckpt


def checkpoint_inference_config(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> InferenceConfig:
    """The inference contract stored in a checkpoint read by :func:`read_checkpoint`."""
    try:
        return InferenceConfig.from_checkpoint(ckpt["unialign"])
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"cannot read checkpoint {path}: its inference config is not valid "
                              f"({where}: {first['msg']}; written by another unialign version?)") from None


def export_checkpoint(model: SMKE, spec: Config | InferenceConfig, tokenizer: PreTrainedTokenizerBase,
                      path: str | Path, kd_dim: int | None = None) -> Path:
    """Write an inference checkpoint (weights + inference contract) that `load` reads.

    `spec` is the run's config (with the teacher's width `kd_dim`; it is stored too, for the
    record) or an :class:`InferenceConfig`."""
    ckpt: dict[str, Any] = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "unialign": inference_config(model, spec, tokenizer, kd_dim).to_checkpoint(),
    }
    if isinstance(spec, Config):
        ckpt["hyper_parameters"] = {"config": spec.model_dump(mode="json")}
    torch_save_atomic(ckpt, path)
    return Path(path)


def student_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trainable model's weights from a checkpoint (the training module stores them under `model.`)."""
    prefix = "model."
    return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[SMKE, InferenceConfig]:
    """The trained model (in eval mode, on `device`) and its inference contract, reading the file once."""
    ckpt = read_checkpoint(checkpoint)
    card = checkpoint_inference_config(ckpt, checkpoint)
    model = _build(card, pretrained=False)
    model.load_state_dict(student_state_dict(ckpt))
    return model.to(device).eval(), card


def load(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[SMKE, Callable, TextTokenizer]:
    """Load a trained model for inference: ``model, preprocess, tokenizer = unialign.load(ckpt)``.

    Needs no network and no training config: architecture, preprocessing and tokenizer files
    travel inside the checkpoint (its :class:`InferenceConfig`).
    """
    model, card = load_model(checkpoint, device)
    tokenizer = TextTokenizer(tokenizer_from_files(card.tokenizer_files), card.max_length)
    return model, card.preprocess.transform(), tokenizer
