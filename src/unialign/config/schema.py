"""The run configuration's schema: one typed section per part of a run (model, teacher, loss,
data, train).

Every section forbids unknown keys so a typo is an error naming the key, never a silently
ignored setting. Reading YAML, overrides and path checks are in :mod:`unialign.config.loading`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# How much of a pretrained tower stays fixed: its embeddings and first N blocks, or all of it.
FreezeLayers = Union[Annotated[int, Field(ge=0)], Literal["all"]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageTowerConfig(_Strict):
    """Pretrained image model whose first blocks become the image encoder."""

    # data2vec2: fairseq's Data2Vec 2.0 image encoder (the paper's), from a file written by
    # `unialign convert data2vec2`; `name` is not used for it.
    backend: Literal["timm", "hf", "data2vec2"] = "timm"
    name: str = "vit_base_patch16_224"
    pretrained: bool = True
    checkpoint: Path | None = None  # local weights file (timm; data2vec2: the converted file)
    layers: int | list[int] = 6  # first N blocks, or explicit block indices
    # Kept fixed during training: the patch embedding and the first N kept blocks, or "all" of the
    # tower (LiT's locked image tower). Frozen parts also run in eval mode (no dropout).
    freeze_layers: FreezeLayers = 0
    # extra timm.create_model / HF config args; data2vec2: architecture fields for random weights
    # (img_size, patch_size, embed_dim, depth, num_heads, ...)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _data2vec2_needs_weights(self) -> "ImageTowerConfig":
        if self.backend == "data2vec2" and self.pretrained and self.checkpoint is None:
            raise ValueError("checkpoint is required with backend data2vec2 and pretrained true: convert "
                             "fairseq's weights with `unialign convert data2vec2 FAIRSEQ.pt OUT.pt`")
        return self

    @field_validator("layers")
    @classmethod
    def _positive_layers(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        if isinstance(v, list) and (not v or any(i < 0 for i in v)):
            raise ValueError(f"must be a non-empty list of block indices >= 0, got {v}")
        return v


class TextTowerConfig(_Strict):
    """Pretrained BERT-like model whose first layers become the text encoder."""

    name: str = "bert-base-uncased"  # HF hub name or local directory
    pretrained: bool = True
    layers: int = Field(6, ge=1)
    max_length: int = Field(64, ge=8)
    freeze_layers: FreezeLayers = 0  # the embeddings and the first N layers, or "all"
    # What the shared block reads at the CLS position: the tower's CLS token (the paper), or the
    # masked mean of its tokens (what sentence encoders such as MiniLM were trained to give).
    pool: Literal["cls", "mean"] = "cls"
    # Dropout inside the text tower (hidden and attention); None keeps the model's own (BERT: 0.1).
    dropout: float | None = Field(None, ge=0, lt=1)


class SharedConfig(_Strict):
    """The randomly initialised modality-shared Transformer block(s)."""

    depth: int = Field(1, ge=0)
    num_heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    layer_scale_init: float = 0.2
    token_type_scale_init: float = 1e-5


class ModelConfig(_Strict):
    image: ImageTowerConfig = Field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)
    shared: SharedConfig = Field(default_factory=SharedConfig)
    # Retrieval embedding: the shared block's CLS itself (the paper), or a linear projection of it,
    # one per modality (CLIP's heads; with shared.depth 0 and frozen towers, LiT's baseline).
    head: Literal["none", "linear"] = "none"
    # ALBEF's image-text matching head (model/itm.py): one fusion block over the shared block's
    # token outputs, for the ITM loss and for re-ranking the dual encoder's top K. Off: no extra
    # parameters, and the state dict is as without it.
    itm: bool = False
    init_checkpoint: Path | None = None  # start from a trained unialign checkpoint (fine-tuning)


class TeacherConfig(_Strict):
    """Frozen self-supervised image model whose CLS gives the distillation target."""

    enabled: bool = True
    backend: Literal["timm", "hf"] = "timm"
    name: str = "beitv2_base_patch16_224"
    pretrained: bool = True
    checkpoint: Path | None = None
    block: int = -1  # which block's CLS is the target (-1: last)
    after_norm: bool = False  # paper: before the final LayerNorm
    view: Literal["same", "separate"] = "same"  # same pixels as the student, or its own augmentation
    # The teacher's input side (None: data.image_size). Above the student's, the teacher sees detail
    # that the student's smaller view has lost (measured in docs/RECIPE.md section 9); its targets then
    # come from a view of its own: the cache (teacher.cache) or teacher.view: separate.
    image_size: int | None = Field(None, ge=8)
    # With view: separate, a colour jitter (brightness, contrast, saturation) after the crop and flip,
    # as the thesis's teacher view had (0.4, 0.4, 0.4).
    color_jitter: tuple[float, float, float] | None = None
    # Precomputed targets (`unialign teacher-cache`): looked up by image id instead of running the
    # teacher. They are of the un-augmented (eval-resized) image, so they equal online targets only
    # when the teacher's view is un-augmented; otherwise an approximation (docs/PERFORMANCE.md).
    # auto: `unialign train` builds the cache before training (or reuses the one built for the same
    # teacher, view and training images) under $XDG_CACHE_HOME/unialign/teacher-cache.
    cache: Literal["auto"] | Path | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)


class LossConfig(_Strict):
    itc_weight: float = Field(1.0, ge=0)
    itc_interm: bool = True  # second ITC on the shared block's first MLP layer (author's code)
    same_image_positives: bool = True  # fixes the author's code treating them as negatives
    kd: Literal["contrastive", "mse", "none"] = "contrastive"
    kd_weight: float = Field(1.0, ge=0)
    bank_size: int = Field(65536, ge=0)
    kd_temperature: float = Field(0.07, gt=0)
    kd_learnable_temperature: bool = False
    # ALBEF (Li et al. 2021): an EMA copy of the student (the momentum model) exists when
    # queue_size > 0 or mod_alpha > 0; both 0 (the default) is the paper's model, unchanged.
    momentum: float = 0.995  # EMA rate of the momentum model
    queue_size: int = 0  # feature queues of momentum embeddings as extra ITC candidates (ALBEF: 65536)
    mod_alpha: float = 0.0  # momentum distillation weight, ramped up over the first epoch (ALBEF: 0.4)
    itm_weight: float = Field(1.0, ge=0)  # weight of ALBEF's ITM loss, trained when model.itm is true

    @field_validator("momentum")
    @classmethod
    def _momentum_range(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"loss.momentum is the EMA rate of the momentum model and needs 0 < momentum < 1, "
                             f"got {v}")
        return v

    @field_validator("queue_size")
    @classmethod
    def _queue_size_range(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"loss.queue_size needs to be >= 0 (0 turns the feature queues off), got {v}")
        return v

    @field_validator("mod_alpha")
    @classmethod
    def _mod_alpha_range(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError(f"loss.mod_alpha is a mixing weight and needs 0 <= mod_alpha <= 1 "
                             f"(0 turns momentum distillation off), got {v}")
        return v

    @property
    def uses_momentum_model(self) -> bool:
        """Whether training keeps the momentum (EMA) model: for the queues or for distillation."""
        return self.queue_size > 0 or self.mod_alpha > 0


class _Source(_Strict):
    # Image ids are namespaced by source, so that two sources numbering their images from 0 do
    # not make unrelated pairs each other's positives (or share a teacher-cache row). Default: the
    # file's name, or the shard folder's name for webdataset sources.
    id_namespace: str | None = None

    def namespace(self) -> str:
        if self.id_namespace:
            return self.id_namespace
        if isinstance(self, WebDatasetSource):
            first = self.urls.split("::")[0]
            return PurePosixPath(first).parent.name or first
        return self.path.name  # type: ignore[attr-defined]


class KarpathySource(_Source):
    type: Literal["karpathy"] = "karpathy"
    path: Path
    images: Path
    splits: list[str] = Field(default_factory=lambda: ["train", "restval"])


class ManifestSource(_Source):
    """JSONL or CSV with one (image, caption[, image_id]) row per pair."""

    type: Literal["manifest"] = "manifest"
    path: Path
    images: Path | None = None  # root for relative image paths (default: the manifest's folder)
    image_column: str = "image"
    caption_column: str = "caption"
    id_column: str = "image_id"


class WebDatasetSource(_Source):
    """Tar shards of image + caption (txt or json), brace-expanded URLs or paths."""

    type: Literal["webdataset"] = "webdataset"
    urls: str
    size: int = Field(ge=1)  # number of pairs: shards have no length, schedules need one
    caption_key: str = "caption"  # key inside a .json member, when there is no .txt


DataSource = Annotated[Union[KarpathySource, ManifestSource, WebDatasetSource], Field(discriminator="type")]


class DataConfig(_Strict):
    train: list[DataSource] = Field(min_length=1)
    val: KarpathySource | ManifestSource | None = None
    val_split: str = "val"  # split read from a Karpathy val source
    image_size: int = Field(224, ge=8)
    train_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range; (1, 1): the whole image, as evaluated
    hflip: bool = True  # paper: on; turn off when captions name left/right
    shuffle_buffer: int = Field(1000, ge=0)  # samples, for webdataset sources
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Loaders ship uint8 images and they are normalised after the host->device copy: a quarter of
    # the bytes to pin and copy, and the float conversion leaves the CPU workers. Same values.
    normalize_on_device: bool = True
    # host: PIL decodes and augments in the loader workers; device: the workers read JPEG headers
    # only and the batch is decoded + cropped on the training device (nvJPEG on CUDA).
    decode: Literal["host", "device"] = "host"
    # Caption batches are padded to the longest caption, rounded up to this (1: no rounding): a
    # handful of lengths instead of one per batch (torch.compile recompiles less) and aligned kernels.
    pad_to_multiple_of: int = Field(8, ge=1)
    num_workers: int = Field(4, ge=0)
    # Keep each training image decoded and transformed after its first use (map-style sources,
    # un-augmented views, data.decode: host). Lasts in the loading process: with num_workers 0 (small
    # data on a CPU) all epochs after the first skip decoding; loader workers start afresh each epoch.
    cache_images: bool = False
    max_bad_fraction: float = Field(0.01, ge=0, le=1)  # fail when more of the data than this is unreadable

    @field_validator("train_scale")
    @classmethod
    def _scale_order(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"needs 0 < min <= max <= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _distinct_id_namespaces(self) -> "DataConfig":
        seen: dict[str, int] = {}
        for i, src in enumerate(self.train):
            ns = src.namespace()
            other = self.train[seen[ns]] if ns in seen else None
            # a namespace given explicitly may be shared on purpose: the same images in two forms
            if other is not None and other != src and not (src.id_namespace or other.id_namespace):
                raise ValueError(f"train[{i}] and train[{seen[ns]}] both number their images in id namespace "
                                 f"{ns!r}; give one of them its own id_namespace")
            seen.setdefault(ns, i)
        return self

    @property
    def unaugmented(self) -> bool:
        """Training views without random crops or flips: each image's view is the same at every epoch
        (what the teacher cache, the frozen-prefix caches and data.cache_images rely on)."""
        return self.train_scale == (1.0, 1.0) and not self.hflip

    @model_validator(mode="after")
    def _cached_images_are_not_augmented(self) -> "DataConfig":
        if self.cache_images and (not self.unaugmented or self.decode != "host"):
            raise ValueError(f"data.cache_images needs un-augmented views decoded on the host (data.train_scale "
                             f"[1, 1], data.hflip false, data.decode host; got {list(self.train_scale)}, "
                             f"{self.hflip}, {self.decode})")
        return self

    @model_validator(mode="after")
    def _device_decode_needs_uint8(self) -> "DataConfig":
        if self.decode == "device" and not self.normalize_on_device:
            raise ValueError("data.decode: device needs data.normalize_on_device: true (images reach the device "
                             "as uint8 pixels)")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(7, ge=1)
    max_steps: int = -1  # optimizer steps; stops the run early and the lr schedule ends with it (-1: `epochs`)
    batch_size: int = Field(256, ge=1)  # per device
    base_lr: float = Field(1e-4, gt=0)  # for a global batch of 256
    scale_lr: bool = True  # lr = base_lr * global_batch / 256
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    # Pretrained towers' learning rate relative to the new parts (shared block, heads, scales), and
    # layer-wise decay inside each tower: its last block gets the tower's rate, each block below
    # it layer_decay times less, the embeddings layer_decay**n times less.
    tower_lr_scale: float = Field(1.0, ge=0)
    layer_decay: float = Field(1.0, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    grad_clip: float | None = None
    accumulate_grad_batches: int = Field(1, ge=1)
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "16-mixed"
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int | Literal["auto"] = "auto"
    num_nodes: int = Field(1, ge=1)
    # ddp: one process per device, each starting the command afresh (scripts, clusters); ddp_spawn /
    # ddp_fork: the worker processes are spawned or forked from this one (notebooks; fork starts in
    # a moment, as nothing is imported again, but only while CUDA is not yet initialised)
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp"] = "auto"
    checkpoint_every_steps: int = Field(1000, ge=1)
    val_every_steps: int | None = None  # default: validate at the end of each epoch
    log_every_steps: int = Field(50, ge=1)
    loggers: list[Literal["csv", "tensorboard", "wandb"]] = Field(default_factory=lambda: ["csv"])
    progress_bar: bool = True
    # torch.compile the towers, shared block(s) and online teacher (in place: same state_dict keys)
    compile: bool = False
    # Keep the output of the image tower's frozen input side and first blocks (model.image.freeze_layers)
    # per training image, computed when the image is first seen; later steps run only the blocks above
    # (training/prefix_cache.py). Exact for un-augmented views; costs images x tokens x width values.
    cache_frozen_image: bool = False
    cache_frozen_text: bool = False  # the same for the text tower's frozen layers (model.text.freeze_layers)

    @model_validator(mode="after")
    def _fsdp_needs_gpu(self) -> "TrainConfig":
        if self.strategy == "fsdp" and self.accelerator == "cpu":
            raise ValueError("train.strategy: fsdp needs a GPU (Lightning has no FSDP on accelerator cpu); "
                             "use train.strategy: ddp on CPU")
        return self


class Config(_Strict):
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)

    @property
    def teacher_image_size(self) -> int:
        """The side of the teacher's input: teacher.image_size, else the student's data.image_size."""
        return self.teacher.image_size or self.data.image_size

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.loss.itc_interm and self.model.shared.depth == 0:
            raise ValueError("loss.itc_interm needs model.shared.depth >= 1 (x_interm comes from the shared block)")
        if self.loss.kd != "none" and not self.teacher.enabled:
            raise ValueError(f"loss.kd is {self.loss.kd!r} but teacher.enabled is false; set loss.kd=none")
        if self.teacher.color_jitter is not None and self.teacher.view != "separate":
            raise ValueError("teacher.color_jitter needs teacher.view: separate (with view: same the teacher "
                             "sees the student's pixels)")
        if self.data.cache_images and self.teacher.enabled and self.teacher.view == "separate":
            raise ValueError("data.cache_images keeps the student's view only; teacher.view: separate draws the "
                             "teacher's own at every step")
        if self.data.decode == "device" and self.teacher.enabled and self.teacher.view == "separate":
            raise ValueError("data.decode: device decodes each image once, on the device, for the student's view; "
                             "teacher.view: separate needs data.decode: host")
        t = self.teacher
        if t.enabled and t.image_size not in (None, self.data.image_size) and t.view == "same" and t.cache is None:
            raise ValueError(f"teacher.image_size {t.image_size} differs from data.image_size {self.data.image_size}, "
                             "but with teacher.view: same the online teacher sees the student's pixels: set "
                             "teacher.cache (auto) or teacher.view: separate")
        if self.teacher.cache is not None and (not self.teacher.enabled or self.loss.kd == "none"):
            raise ValueError("teacher.cache is set but no distillation runs (teacher.enabled false or loss.kd none)")
        for part, on in (("image", self.train.cache_frozen_image), ("text", self.train.cache_frozen_text)):
            why = []
            if on and getattr(self.model, part).freeze_layers == 0:
                why.append(f"model.{part}.freeze_layers is 0 (nothing frozen to cache)")
            if on and part == "image" and not self.data.unaugmented:
                why.append(f"training views are augmented (data.train_scale {list(self.data.train_scale)}, "
                           f"data.hflip {self.data.hflip}; the cache needs [1, 1] and false)")
            if on and self.train.strategy == "fsdp":
                why.append("train.strategy is fsdp (the cached blocks would be sharded)")
            if why:
                raise ValueError(f"train.cache_frozen_{part}: " + "; ".join(why))
        return self
