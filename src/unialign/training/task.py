"""The training objective as a plain module: student (+ online teacher) -> ITC + KD losses.

No Lightning here: `SMKETraining.training_step` calls it, and so do the benchmarks and the
FSDP and compile tests (as open_clip's `training_forward` or FLAVA's model returning its losses).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, LossConfig
from ..losses import ContrastiveDistillationLoss, ContrastiveLoss, MSEDistillationLoss
from ..losses.itm import itm_loss
from ..losses.momentum import MomentumContrastiveLoss, ema_update_
from ..model.factory import create_student, read_checkpoint, student_state_dict
from ..model.smke import SMKE, Embeddings, no_weight_decay_names
from ..model.teacher import Teacher
from ..model.towers import frozen_count, prefix_tensors
from .prefix_cache import FrozenPrefixCache, frozen_prefix_cache, image_prefix_inputs

log = logging.getLogger(__name__)


class DistillTask(nn.Module):
    """Student (`model`, an SMKE), the optional online teacher, and the ITC and KD losses.

    ``forward(batch)`` returns the named losses (``itc``, ``itc_interm``, ``kd``: those the config
    asks for) and their weighted sum, ``loss``. The batch holds ``image``, ``input_ids``,
    ``attention_mask`` and ``image_id``; for the KD loss either ``teacher_target`` (from a teacher
    cache) or a teacher in the task (run on ``teacher_image`` when the batch has one, else ``image``).
    With ``train.cache_frozen_image`` / ``_text`` the batch also holds the rows `plan` set on the host
    (``SMKETraining.on_before_batch_transfer`` calls it).

    With ``loss.queue_size`` or ``loss.mod_alpha`` (ALBEF), `momentum_model` is an EMA copy of the
    student (no gradient, no dropout), updated in `after_optimizer_step`, and `itc_momentum` replaces
    the main ITC (feature queues, momentum distillation). MoD's weight ramps from 0 over the first
    `steps_per_epoch` optimizer steps; whoever drives the training sets it (None: no ramp).
    """

    def __init__(self, model: SMKE, loss: LossConfig, teacher: Teacher | None = None,
                 kd: nn.Module | None = None) -> None:
        super().__init__()
        # Registered in this order (teacher, model, itc, kd), as SMKETraining registers the same
        # modules: the order of the parameters, hence of the optimizer's state, is unchanged.
        self.teacher = teacher
        self.model = model
        self.itc = ContrastiveLoss()
        self.kd = kd
        self.loss_config = loss
        # Registered after the others, so the names and order of the existing parameters stay as they were.
        self.momentum_model: SMKE | None = None
        self.itc_momentum: MomentumContrastiveLoss | None = None
        if loss.uses_momentum_model:
            self.momentum_model = momentum_copy(model)
            self.itc_momentum = MomentumContrastiveLoss(model.width, loss.queue_size)
        self.steps_per_epoch: int | None = None
        # train.cache_frozen_image / _text: the towers' frozen prefixes (planned by the caller, `plan`)
        self.image_prefix: FrozenPrefixCache | None = None
        self.text_prefix: FrozenPrefixCache | None = None
        # Decided at construction, on the real shapes (see SMKE.no_weight_decay); the teacher is frozen.
        self._no_decay = frozenset({f"model.{name}" for name in model.no_weight_decay()}
                                   | no_weight_decay_names(kd, "kd."))

    @classmethod
    def from_config(cls, cfg: Config, cached_kd_dim: int | None = None) -> DistillTask:
        """The task a run config describes. `cached_kd_dim`: the width of the teacher cache's targets,
        when ``teacher.cache`` serves them (then no teacher is built)."""
        teacher = None
        if cfg.teacher.enabled and cfg.teacher.cache is not None:
            if cached_kd_dim is None:
                raise ValueError("teacher.cache is set: DistillTask.from_config needs the cache's target width")
            kd_dim: int | None = cached_kd_dim
        elif cfg.teacher.enabled and cfg.loss.kd != "none":
            # Own RNG stream: the student's initialisation (and dropout) must not depend on
            # whether the teacher is built here or its targets come from a cache.
            with torch.random.fork_rng(devices=[]):
                teacher = Teacher(cfg.teacher)
            kd_dim = teacher.width
        else:
            kd_dim = None
        model = create_student(cfg, kd_dim)
        if cfg.model.init_checkpoint is not None:
            init_from(model, cfg.model.init_checkpoint)
        if cfg.train.compile:
            # In place (nn.Module.compile): parameter names and checkpoints stay the same.
            for part in (model.image_tower, model.text_tower, *model.shared):
                part.compile()
            if teacher is not None:
                teacher.backbone.compile()
        loss = cfg.loss
        kd: nn.Module | None = None
        if loss.kd == "contrastive":
            kd = ContrastiveDistillationLoss(kd_dim, bank_size=loss.bank_size, temperature=loss.kd_temperature,
                                             learnable_temperature=loss.kd_learnable_temperature)
        elif loss.kd == "mse":
            kd = MSEDistillationLoss()
        task = cls(model, loss, teacher, kd)
        for on, tower, frozen, attr, length in (
                (cfg.train.cache_frozen_image, model.image_tower, cfg.model.image.freeze_layers, "image", None),
                (cfg.train.cache_frozen_text, model.text_tower, cfg.model.text.freeze_layers, "text",
                 cfg.model.text.max_length)):
            if on:
                if why := tower.split_error():
                    raise ValueError(f"train.cache_frozen_{attr}: {why}")
                n = frozen_count(frozen, tower.num_blocks)
                weights = prefix_tensors(tower, tower.num_blocks, n)
                # A caption's tokens are its key: only the dtype is left to decide.
                inputs = image_prefix_inputs(cfg) if attr == "image" else [cfg.train.precision]
                setattr(task, f"{attr}_prefix", frozen_prefix_cache(n, length, weights, inputs))
        return task

    def plan(self, batch: dict[str, Any]) -> None:
        """On the host, before the batch moves: which stored prefixes it reads and fills (if cached)."""
        if self.image_prefix is not None:
            batch["image_rows"], batch["image_fill"] = self.image_prefix.plan(batch["image_id"].tolist())
        if self.text_prefix is not None:
            keys = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
            batch["text_rows"], batch["text_fill"] = self.text_prefix.plan(keys)

    def _embeddings(self, batch: dict[str, Any]) -> tuple[Embeddings, Embeddings]:
        """The student's image and text embeddings, through the frozen-prefix caches where there are any."""
        model, pixels, ids, mask = self.model, batch["image"], batch["input_ids"], batch["attention_mask"]
        if self.image_prefix is None and self.text_prefix is None:
            return model(pixels, ids, mask)
        if (c := self.image_prefix) is None:
            img = model.image_embeddings(pixels)
        else:
            tower = model.image_tower
            stored = c.read(lambda i: tower.forward_prefix(pixels[i], c.n_blocks), batch["image_rows"],
                            batch["image_fill"])
            img = model.embed_image_tokens(tower.forward_suffix(stored, c.n_blocks))
        if (t := self.text_prefix) is None:
            txt = model.text_embeddings(ids, mask)
        else:
            text = model.text_tower
            stored = t.read(lambda i: text.forward_prefix(ids[i], mask[i], t.n_blocks), batch["text_rows"],
                            batch["text_fill"], ids.shape[1])
            txt = model.embed_text_tokens(text.forward_suffix(stored, mask, t.n_blocks), mask)
        return img, txt

    @property
    def kd_dim(self) -> int | None:
        """The width of the KD targets (None without distillation)."""
        head = self.model.kd_head
        return None if head is None else int(head[-1].out_features)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.loss_config
        image_ids = batch["image_id"] if cfg.same_image_positives else None
        img, txt = self._embeddings(batch)
        scale, scale_interm = self.model.scales()
        if self.itc_momentum is None:
            itc = self.itc(img.embedding, txt.embedding, scale, image_ids)
        else:
            m_img, m_txt = self._momentum_embeddings(batch)
            itc = self.itc_momentum(img.embedding, txt.embedding, m_img, m_txt, scale, image_ids, self.mod_alpha())
        out = {"itc": itc}
        if cfg.itc_interm:
            # In-batch, as the author's code: the queues and ALBEF's distillation are of the final embeddings.
            out["itc_interm"] = self.itc(img.interm, txt.interm, scale_interm, image_ids)
            itc = (itc + out["itc_interm"]) / 2
        loss = cfg.itc_weight * itc
        if self.kd is not None:
            targets = batch.get("teacher_target")  # from the teacher cache, set before the device transfer
            if targets is None:
                if self.teacher is None:
                    raise RuntimeError("teacher.cache is set but the batch has no teacher_target "
                                       "(the cache lookup runs in on_before_batch_transfer)")
                targets = self.teacher(batch.get("teacher_image", batch["image"]))
            out["kd"] = self.kd(img.kd.float(), txt.kd.float(), targets, image_ids)
            loss = loss + cfg.kd_weight * out["kd"]
        if self.model.itm_head is not None:
            # ALBEF's hard negatives are drawn from the local batch's ITC similarities; captions of
            # the same image are never drawn, whatever same_image_positives says for ITC.
            sim = (img.embedding @ txt.embedding.T).detach()
            out["itm"] = itm_loss(self.model, img.tokens, txt.tokens, txt.mask, sim, batch["image_id"], scale).loss
            loss = loss + cfg.itm_weight * out["itm"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def _momentum_embeddings(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.momentum_model is not None
        if self.momentum_model.training:  # Lightning's .train() reaches it too: keep dropout off
            self.momentum_model.eval()
        img, txt = self.momentum_model(batch["image"], batch["input_ids"], batch["attention_mask"])
        return img.embedding, txt.embedding

    def mod_alpha(self) -> float:
        """MoD's weight now: ALBEF's linear ramp from 0 to ``loss.mod_alpha`` over the first epoch."""
        alpha = self.loss_config.mod_alpha
        if alpha == 0 or self.itc_momentum is None or not self.steps_per_epoch:
            return alpha
        return alpha * min(1.0, self.itc_momentum.steps_taken / self.steps_per_epoch)

    def no_weight_decay(self) -> set[str]:
        """Names (as in this module: ``model.``, ``kd.``) of the trained parameters without weight decay."""
        return set(self._no_decay)

    def lr_scales(self, tower_scale: float, layer_decay: float) -> dict[str, float]:
        """Learning-rate multipliers of the student's parameters (see `SMKE.lr_scales`); others get 1."""
        return {f"model.{name}": scale for name, scale in self.model.lr_scales(tower_scale, layer_decay).items()}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Keep the learned scales in range: the ITC logit scales, the KD temperature; then move the
        momentum model towards the student (after the clamp, so it averages in-range scales)."""
        self.model.clamp_scales_()
        if isinstance(self.kd, ContrastiveDistillationLoss):
            self.kd.clamp_temperature_()
        if self.momentum_model is not None and self.itc_momentum is not None:
            ema_update_(self.momentum_model.parameters(), self.model.parameters(), self.loss_config.momentum)
            self.itc_momentum.count_step_()


def momentum_copy(model: SMKE) -> SMKE:
    """A frozen copy of the student (ALBEF's momentum model), equal to it, in eval mode.

    Frozen tower parts are duplicated too (simple and safe under DDP and checkpointing; the cost
    is their memory). Parts compiled in place keep, after deepcopy, a compiled call bound to the
    student's module: they are compiled again on their own copy."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
            module.compile()
    twin.requires_grad_(False)
    return twin.eval()


def init_from(model: SMKE, path: Path) -> None:
    """Start from a trained model (``model.init_checkpoint``: e.g. retrieval fine-tuning).

    The optional parts (KD head, second logit scale) are taken only where the new
    configuration has them with the same shape; every other weight must match.
    """
    own = model.state_dict()
    optional = ("kd_head.", "logit_scale_interm")
    state = {k: v for k, v in student_state_dict(read_checkpoint(path)).items()
             if not k.startswith(optional) or (k in own and own[k].shape == v.shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k in missing if not k.startswith(optional)]
    if wrong or unexpected:
        raise ValueError(f"model.init_checkpoint {path} does not match the configured model: "
                         f"missing {wrong[:5]}, unexpected {unexpected[:5]}")
    log.info("initialised the model from %s", path)
