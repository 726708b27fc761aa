"""Baseline: a Hugging Face `VisionTextDualEncoderModel` trained in unialign's harness.

The peer a user would reach for: the run config's two towers (same kept and frozen layers), joined
by transformers' own dual encoder (pooled outputs, linear projections to the image tower's width,
its logit-scale init and contrastive loss), trained on the same data, batches, seed and optimiser
recipe as an S-SMKE run and saved as a transformers folder that ``hf:FOLDER`` evaluates.

`train.cache_frozen_image` works here as in S-SMKE runs (training/prefix_cache.py): while the model
trains, its vision model's embeddings and frozen blocks are set aside and the cached output of
those blocks enters where the embeddings' output would; the folder is saved whole.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from transformers import (AutoConfig, AutoModel, PreTrainedModel, VisionTextDualEncoderConfig,
                          VisionTextDualEncoderModel, ViTImageProcessor)
from transformers.image_utils import PILImageResampling

from ..config import Config, ConfigError, DataConfig, FreezeLayers, save_config
from ..data.sampler import derive_seed
from ..model.factory import create_tokenizer
from ..model.smke import no_weight_decay_names, param_groups
from ..model.towers import (block_output, freeze_tower, frozen_count, frozen_modules, hf_layer_list, hf_split_error,
                            truncate_hf_layers)
from .callbacks import BadSamples
from .datamodule import RetrievalDataModule
from .module import DROPOUT_STREAM, adamw_warmup_cosine, fused_adamw
from .prefix_cache import frozen_prefix_cache, image_prefix_inputs
from .trainer import build_trainer

HF_FOLDER = "hf_dual_encoder"  # the saved model, inside the run's output directory
RESAMPLE = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}


def _tower(name: str, pretrained: bool, layers: int | list[int], freeze: FreezeLayers, **overrides: Any
           ) -> PreTrainedModel:
    """A tower as `AutoModel` gives it (pooler kept: the dual encoder embeds its pooled output), cut
    to the kept blocks and frozen as unialign's towers are."""
    if pretrained:
        model = AutoModel.from_pretrained(name, **overrides)
    else:
        model = AutoModel.from_config(AutoConfig.from_pretrained(name, **overrides))
    truncate_hf_layers(model, layers, f"Hugging Face model {name!r}")
    freeze_tower(model, model.config.num_hidden_layers, freeze)
    return model


def build_hf_dual_encoder(cfg: Config) -> VisionTextDualEncoderModel:
    """The dual encoder of the run config's towers; projection_dim is the image tower's width (S-SMKE's)."""
    image, text = cfg.model.image, cfg.model.text
    if image.backend != "hf":
        raise ConfigError(f"the Hugging Face dual-encoder baseline needs model.image.backend: hf, got {image.backend}")
    vision = _tower(image.name, image.pretrained, image.layers, image.freeze_layers, **image.kwargs)
    mask_token = getattr(vision.embeddings, "mask_token", None)
    if mask_token is not None:  # DINOv2/BEiT's masked-modelling token gets no gradient (as in HFImageTower)
        mask_token.requires_grad_(False)
    dropout = {} if text.dropout is None else {"hidden_dropout_prob": text.dropout,
                                               "attention_probs_dropout_prob": text.dropout}
    language = _tower(text.name, text.pretrained, text.layers, text.freeze_layers, **dropout)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision.config, language.config, projection_dim=vision.config.hidden_size)
    return VisionTextDualEncoderModel(config, vision_model=vision, text_model=language)


def eval_image_processor(data: DataConfig) -> ViTImageProcessor:
    """unialign's eval transform (`build_image_transform(..., train=False)`) as a transformers
    processor: squash to image_size x image_size (no crop), same interpolation, /255, mean/std."""
    return ViTImageProcessor(do_resize=True, size={"height": data.image_size, "width": data.image_size},
                             resample=RESAMPLE[data.interpolation], do_rescale=True, rescale_factor=1 / 255,
                             do_normalize=True, image_mean=list(data.mean), image_std=list(data.std))


class _CachedPrefix(nn.Module):
    """Takes the place of a vision model's embeddings while its frozen prefix is read from a cache:
    the "pixel values" the model is handed are already that prefix's output tokens."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        # ViT's forward reads the input dtype off its patch projection before calling the embeddings
        self.patch_embeddings = embeddings.patch_embeddings

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return pixel_values


class _Prefix(nn.Module):
    """A vision model's embeddings and first blocks, set aside: pixels -> those blocks' output tokens."""

    def __init__(self, embeddings: nn.Module, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.blocks = nn.ModuleList(blocks)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.embeddings(pixels)
        for block in self.blocks:
            tokens = block_output(block(tokens))
        return tokens


@contextmanager
def prefix_set_aside(vision: PreTrainedModel, n: int) -> Iterator[_Prefix]:
    """For the duration, `vision` runs only its blocks above the first `n`, on the tokens it is given
    as pixel values; yields the part set aside. The model is whole again afterwards, whatever happens."""
    if why := hf_split_error(vision):
        raise ConfigError(f"train.cache_frozen_image: {why}")
    parent, attr = hf_layer_list(vision)  # type: ignore[misc]
    embeddings, blocks = vision.embeddings, getattr(parent, attr)
    vision.embeddings = _CachedPrefix(embeddings)
    setattr(parent, attr, nn.ModuleList(blocks[n:]))
    try:
        yield _Prefix(embeddings, blocks[:n])
    finally:
        vision.embeddings = embeddings
        setattr(parent, attr, blocks)


class HFDualTraining(L.LightningModule):
    """Trains a `VisionTextDualEncoderModel` with its own loss (`return_loss=True`) and S-SMKE's optimiser.

    `prefix`: the vision model's frozen part, set aside (`prefix_set_aside`) with `train.cache_frozen_image`:
    its output is computed once per image and kept in `prefix_cache`."""

    def __init__(self, model: VisionTextDualEncoderModel, cfg: Config, prefix: _Prefix | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.prefix = prefix  # a submodule: it moves to the training device with the model
        # Keyed as S-SMKE runs key theirs (training.task): a unialign run over the same data and frozen
        # image blocks fills the cache this one reads, within `shared_prefix_caches`.
        self.prefix_cache = None if prefix is None else frozen_prefix_cache(
            len(prefix.blocks), None, prefix.state_dict().values(), image_prefix_inputs(cfg))
        self._frozen = [*frozen_modules(model.vision_model), *frozen_modules(model.text_model),
                        *([] if prefix is None else [prefix])]
        self._no_decay = no_weight_decay_names(model, "model.")

    def train(self, mode: bool = True) -> "HFDualTraining":
        super().train(mode)
        for module in self._frozen:  # frozen layers are fixed functions (no dropout), as in S-SMKE
            module.eval()
        return self

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the host: which cached prefix rows the batch reads and fills (as S-SMKE's runs)."""
        if self.prefix_cache is not None and self._trainer is not None and self.trainer.training:
            batch["image_rows"], batch["image_fill"] = self.prefix_cache.plan(batch["image_id"].tolist())
        return batch

    def on_fit_start(self) -> None:
        self.train()  # transformers loads models in eval mode and Lightning keeps each module's mode
        torch.manual_seed(derive_seed(self.cfg.seed, DROPOUT_STREAM, self.global_rank))  # as SMKETraining

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch["size"] == 0:  # every sample unreadable (counted by the BadSamples callback)
            return None
        pixels = batch["image"]
        if self.prefix is not None:
            pixels = self.prefix_cache.read(lambda i: self.prefix(pixels[i]), batch["image_rows"],
                                            batch["image_fill"])
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=pixels, return_loss=True)
        self.log("train/loss", out.loss, prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=batch["image"].shape[0])
        self.log("train/logit_scale", self.model.logit_scale.detach().exp(), on_step=True, on_epoch=False)
        return out.loss

    def configure_optimizers(self) -> dict[str, Any]:
        t = self.cfg.train
        groups = lambda lr: param_groups(self.named_parameters(), t.weight_decay, self._no_decay, lr)  # noqa: E731
        return adamw_warmup_cosine(self.trainer, t, groups, fused_adamw(self.device, t))


def save_hf_folder(model: VisionTextDualEncoderModel, tokenizer: Any, data: DataConfig, folder: Path) -> Path:
    """Model + eval image processor + tokenizer, written to a temporary folder then renamed into place."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    eval_image_processor(data).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def train_hf_dual_encoder(cfg: Config, output_dir: str | Path,
                          callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train the baseline of `cfg` into `output_dir`; its model ends up in ``output_dir/hf_dual_encoder``.

    Same trainer as `train` (precision, devices, accumulation, clipping, bad-sample guard, logs), but
    no resume and no unialign checkpoint: an output directory that already holds the folder is refused.
    Returns ``{"global_step", "epochs", "seconds", "samples_seen", "metrics", "folder"}`` (as `train`'s summary)."""
    if cfg.train.cache_frozen_text:
        raise ConfigError("train.cache_frozen_text: the Hugging Face dual-encoder baseline caches only the image "
                          "tower's frozen prefix (train.cache_frozen_image)")
    output = Path(output_dir)
    folder = output / HF_FOLDER
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; choose another output directory")
    output.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output / "config.yaml")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = create_tokenizer(cfg)
    model = build_hf_dual_encoder(cfg)
    datamodule = RetrievalDataModule(cfg.data, tokenizer, cfg.model.text.max_length, cfg.train.batch_size, cfg.seed)
    trainer = build_trainer(cfg, output, list(callbacks))
    n = frozen_count(cfg.model.image.freeze_layers, model.vision_model.config.num_hidden_layers)
    start = time.perf_counter()
    with warnings.catch_warnings(), \
            (prefix_set_aside(model.vision_model, n) if cfg.train.cache_frozen_image else nullcontext()) as prefix:
        # The data module (shared with `train`) offers a val loader; this baseline is scored after training.
        warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")
        module = HFDualTraining(model, cfg, prefix)
        trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        save_hf_folder(module.model, tokenizer, cfg.data, folder)
    trainer.strategy.barrier("unialign-hf-dual-saved")
    bad_samples = next((c for c in trainer.callbacks if isinstance(c, BadSamples)), None)
    return {"global_step": trainer.global_step, "epochs": trainer.current_epoch, "seconds": round(seconds, 3),
            "samples_seen": bad_samples.seen if bad_samples is not None else None,  # this rank's
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}, "folder": str(folder)}
