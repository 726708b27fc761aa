"""One place that turns a config (or a checkpoint) into a model, its transform and tokenizer."""

from __future__ import annotations

import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..config import Config
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


def create_student(cfg: Config, kd_dim: int | None, tower_meta: dict[str, Any] | None = None) -> SMKE:
    """Build the trainable model; with `tower_meta` (from a checkpoint) no weights are fetched."""
    m = cfg.model
    pretrained = tower_meta is None
    image = build_image_tower(m.image.backend, m.image.name, pretrained and m.image.pretrained,
                              m.image.checkpoint if pretrained else None, m.image.layers, m.image.kwargs,
                              hf_config=(tower_meta or {}).get("image_hf_config"))
    text = TextTower(m.text.name, pretrained and m.text.pretrained, m.text.layers,
                     hf_config=(tower_meta or {}).get("text_hf_config"), dropout=m.text.dropout)
    model = SMKE(image, text, shared_depth=m.shared.depth, num_heads=m.shared.num_heads,
                 mlp_ratio=m.shared.mlp_ratio, layer_scale_init=m.shared.layer_scale_init,
                 token_type_scale_init=m.shared.token_type_scale_init, kd_dim=kd_dim,
                 interm_logit_scale=cfg.loss.itc_interm, text_pool=m.text.pool, head=m.head)
    model.freeze(m.image.freeze_layers, m.text.freeze_layers)
    return model


def tower_meta(model: SMKE, tokenizer: PreTrainedTokenizerBase, kd_dim: int | None) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the model offline: tower configs and tokenizer files."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    return {
        "image_hf_config": model.image_tower.hf_config,
        "text_hf_config": model.text_tower.hf_config,
        "tokenizer_files": files,
        "kd_dim": kd_dim,
    }


def tokenizer_from_files(files: dict[str, bytes]) -> PreTrainedTokenizerBase:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)


def create_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(cfg.model.text.name)


def eval_transform(cfg: Config) -> Callable:
    from ..data.transforms import build_image_transform

    d = cfg.data
    return build_image_transform(d.image_size, d.mean, d.std, train=False, interpolation=d.interpolation)


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
    return upgrade_checkpoint(ckpt)


# Parameters that were 0-d before they became (1,)-shaped for FSDP, which cannot shard 0-d ones.
_FORMER_SCALARS = ("logit_scale", "logit_scale_interm", "log_inv_temperature")


def upgrade_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Read checkpoints written before the logit scales and the KD temperature became (1,)-shaped:
    their weights, and their Adam moments (a 0-d moment can only belong to one of them), are
    reshaped in place; ``step`` counters stay 0-d."""
    state = ckpt.get("state_dict", {})
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in _FORMER_SCALARS and value.ndim == 0:
            state[key] = value.reshape(1)
    for optimizer in ckpt.get("optimizer_states", []):
        for moments in optimizer.get("state", {}).values():
            for name, value in moments.items():
                if name != "step" and isinstance(value, torch.Tensor) and value.ndim == 0:
                    moments[name] = value.reshape(1)
    return ckpt


def export_checkpoint(model: SMKE, cfg: Config, tokenizer: PreTrainedTokenizerBase, path: str | Path,
                      kd_dim: int | None = None) -> Path:
    """Write an inference checkpoint (weights + config + tower metadata) that `load` reads."""
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"config": cfg.model_dump(mode="json")},
        "unialign": tower_meta(model, tokenizer, kd_dim),
    }
    torch_save_atomic(ckpt, path)
    return Path(path)


def student_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trainable model's weights from a checkpoint (the training module stores them under `model.`)."""
    prefix = "model."
    return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def load(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[SMKE, Callable, TextTokenizer]:
    """Load a trained model for inference: ``model, preprocess, tokenizer = unialign.load(ckpt)``.

    Needs no network: tower shapes and tokenizer files travel inside the checkpoint.
    """
    ckpt = read_checkpoint(checkpoint)
    cfg = Config.model_validate(ckpt["hyper_parameters"]["config"])
    meta = ckpt["unialign"]
    model = create_student(cfg, meta["kd_dim"], tower_meta=meta)
    state = student_state_dict(ckpt)
    if model.kd_head is None:  # checkpoints of runs without KD once carried an unused head
        state = {k: v for k, v in state.items() if not k.startswith("kd_head.")}
    model.load_state_dict(state)
    tokenizer = TextTokenizer(tokenizer_from_files(meta["tokenizer_files"]), cfg.model.text.max_length)
    return model.to(device).eval(), eval_transform(cfg), tokenizer
