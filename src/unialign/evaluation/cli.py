"""Command-line wiring of the evaluation suite, kept here so `unialign.cli` needs only three calls:

    register_retrieval(eval_sub)   # `unialign eval retrieval` (--checkpoint or --model; Karpathy or manifest)
    register_eval(eval_sub)        # `unialign eval zeroshot | linear-probe | finetune-image | glue`
    register_report(sub)           # `unialign report`

Every handler writes a result JSON with `task`, `model` and `dataset`, the fields
`unialign report` places results by.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from ..cli import int_at_least
from .specs import FORMATS, GLUE_DEFAULTS, GLUE_TASKS, EvalError, FinetuneConfig, with_overrides


def _friendly(handler: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Bad input (a dataset layout, a field, a model spec) ends with its message, not a traceback."""
    def run(args: argparse.Namespace) -> None:
        from ..data.records import DataError  # here, not at the top: the data package imports Lightning
        from ..files import WriteError
        from ..model.factory import CheckpointError

        try:
            handler(args)
        except (EvalError, DataError, CheckpointError, WriteError) as err:
            print(f"unialign: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return run


def _finish(result: dict[str, Any], args: argparse.Namespace, keys: tuple[str, ...], table: str | None = None) -> None:
    """Write the result JSON and print its Markdown table (`table`, or one row of `keys`)."""
    from ..files import write_json_atomic

    if getattr(args, "name", None):
        result["model"] = args.name
    write_json_atomic(args.output, result)
    shown = [k for k in keys if isinstance(result.get(k), (int, float))]
    if table is not None:
        print(table)
    else:
        print("| " + " | ".join(shown) + " |\n|" + "---|" * len(shown))
        print("| " + " | ".join(f"{result[k]:.2f}" for k in shown) + " |")
    if result.get("images_skipped"):
        print(f"{result['images_skipped']} unreadable image(s) skipped; listed in {args.output}")
    if result.get("images_missing"):
        print(f"scored {result['n_images']} images and {result['n_captions']} captions; "
              f"{result['images_missing']} image(s) and {result.get('captions_missing', 0)} caption(s) missing")
    print(f"wrote {args.output}")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return value


def _common(p: argparse.ArgumentParser, model_flag: bool = True, batch_flag: bool = True) -> None:
    if model_flag:
        p.add_argument("--model", required=True,
                       help="unialign checkpoint path, openclip:ARCH[/PRETRAINED] or hf:NAME_OR_PATH")
    p.add_argument("--name", help="label for the model in results and reports (default: the --model text)")
    p.add_argument("--output", required=True, help="results JSON")
    if batch_flag:
        p.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per encoding batch")
    p.add_argument("--num-workers", type=int_at_least(0), default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _dataset_args(p: argparse.ArgumentParser, train: bool) -> None:
    p.add_argument("--dataset", required=True,
                   help="test set: class folders (folder/imagenet) or a CIFAR python folder")
    if train:
        p.add_argument("--train-dataset", help="training set (default: --dataset, right for CIFAR's one folder)")
    p.add_argument("--format", choices=FORMATS, default="folder")
    p.add_argument("--class-map", help="imagenet: folder id -> class name file (default: shipped ImageNet-1K map)")
    p.add_argument("--dataset-name", help="name in results/reports (default: imagenet1k/cifar10/cifar100/folder name)")


# --------------------------------------------------------------------------------------- retrieval


@_friendly
def _retrieval(args: argparse.Namespace) -> None:
    from ..report import RECALL_KEYS, markdown_table
    from .models import load_eval_model
    from .run import evaluate_retrieval_model

    model = load_eval_model(args.model or args.checkpoint, args.device)
    result = evaluate_retrieval_model(model, args.karpathy, args.manifest, args.images, args.split,
                                      args.dataset_name, args.batch_size, args.num_workers, not args.no_progress,
                                      args.max_missing_fraction, args.rerank, query_bank=args.query_bank)
    if args.checkpoint:
        result["checkpoint"] = str(args.checkpoint)
    tables = [_rerank_table(result, RECALL_KEYS)] if args.rerank else []
    if args.query_bank:
        bank = result["query_bank"]
        tables.append(markdown_table(("scores", *RECALL_KEYS), [
            ["cosine", *(result[k] for k in RECALL_KEYS)],
            [f"query bank ({bank['bank_captions']} captions, {bank['bank_images']} images, beta {bank['beta']:.1f})",
             *(bank[k] for k in RECALL_KEYS)]]))
    _finish(result, args, RECALL_KEYS, "\n\n".join(tables) or None)


def _rerank_table(result: dict[str, Any], keys: tuple[str, ...]) -> str:
    """Dual encoder and ITM re-ranked recalls side by side, with what each took."""
    rows = [("dual encoder", result, "encode_rank_seconds"),
            (f"ITM re-rank top {result['rerank_k']}", result["reranked"], "rerank_seconds")]
    lines = ["| ranking | " + " | ".join(keys) + " | seconds |", "|---|" + "---|" * (len(keys) + 1)]
    for label, metrics, seconds in rows:
        lines.append(f"| {label} | " + " | ".join(f"{metrics[k]:.2f}" for k in keys) + f" | {result[seconds]:.1f} |")
    return "\n".join(lines)


def register_retrieval(eval_subparsers: argparse._SubParsersAction) -> None:
    """`unialign eval retrieval`: a unialign --checkpoint or any --model, on a Karpathy split or a manifest."""
    r = eval_subparsers.add_parser("retrieval", help="image-text retrieval recall@K (Karpathy split or manifest)")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="unialign checkpoint")
    which.add_argument("--model", help="unialign checkpoint path, openclip:ARCH[/PRETRAINED] or hf:NAME_OR_PATH")
    data = r.add_mutually_exclusive_group(required=True)
    data.add_argument("--karpathy", help="dataset_coco.json / dataset_flickr30k.json format")
    data.add_argument("--manifest", help="JSONL/CSV with image, caption[, image_id] (one file = one split)")
    r.add_argument("--images", help="image root (required with --karpathy; default for a manifest: its folder)")
    r.add_argument("--split", default="test", help="Karpathy split")
    r.add_argument("--dataset-name", help="name in results/reports (default: coco / flickr30k / file stem)")
    r.add_argument("--max-missing-fraction", type=_fraction, default=0.01,
                   help="fail when more of the test images than this are missing or unreadable (default 0.01); "
                        "a smaller gallery scores higher than the benchmark's")
    r.add_argument("--rerank", type=int_at_least(0), default=0, metavar="K",
                   help="also re-rank each query's top K with the checkpoint's ITM head (model.itm) and report "
                        "both rankings (default 0: the dual encoder only)")
    r.add_argument("--query-bank", metavar="SPLITS|MANIFEST",
                   help="also report recalls with query-bank normalisation (the inverted softmax over training "
                        "queries, docs/EVALUATION.md): the training splits of the --karpathy file, e.g. train or "
                        "train,restval, or the training manifest with --manifest")
    _common(r, model_flag=False)
    r.set_defaults(func=_retrieval)


# --------------------------------------------------------------------------------------- classification


@_friendly
def _zeroshot(args: argparse.Namespace) -> None:
    from .models import load_eval_model
    from .zeroshot import evaluate_zeroshot

    result = evaluate_zeroshot(load_eval_model(args.model, args.device), args.dataset, args.format, args.split,
                               args.class_map, args.templates, args.dataset_name, args.batch_size,
                               args.num_workers, not args.no_progress)
    _finish(result, args, ("top1", "top5", "mean_per_class_recall"))


@_friendly
def _linear_probe(args: argparse.Namespace) -> None:
    from .linear_probe import evaluate_linear_probe
    from .models import load_eval_model

    result = evaluate_linear_probe(load_eval_model(args.model, args.device), args.train_dataset or args.dataset,
                                   args.dataset, args.format, args.class_map, args.val_fraction,
                                   max_iter=args.max_iter, dataset_name=args.dataset_name,
                                   batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
                                   progress=not args.no_progress)
    _finish(result, args, ("top1", "top5", "mean_per_class_recall", "l2"))


def _finetune_args(p: argparse.ArgumentParser, defaults: FinetuneConfig) -> None:
    """Optimiser flags; unset ones keep the task's defaults (shown in --help)."""
    p.add_argument("--checkpoint", required=True, help="unialign checkpoint (fine-tuning needs the real network)")
    p.add_argument("--epochs", type=int_at_least(1), help=f"default {defaults.epochs}")
    p.add_argument("--batch-size", type=int_at_least(1),
                   help=f"training and evaluation batch (default {defaults.batch_size})")
    p.add_argument("--lr", type=float, help=f"default {defaults.lr}")
    p.add_argument("--weight-decay", type=float, help=f"default {defaults.weight_decay}")
    p.add_argument("--warmup-fraction", type=float, help=f"default {defaults.warmup_fraction}")
    p.add_argument("--schedule", choices=("cosine", "linear"), help=f"default {defaults.schedule}")
    p.add_argument("--label-smoothing", type=float, help=f"default {defaults.label_smoothing}")
    p.add_argument("--precision", choices=("32", "bf16"), help=f"default {defaults.precision}")
    p.add_argument("--seed", type=int, help=f"default {defaults.seed}")


def _finetune_config(args: argparse.Namespace, defaults: FinetuneConfig) -> FinetuneConfig:
    return with_overrides(defaults, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          weight_decay=args.weight_decay, warmup_fraction=args.warmup_fraction,
                          schedule=args.schedule, label_smoothing=args.label_smoothing, precision=args.precision,
                          seed=args.seed)


@_friendly
def _finetune_image(args: argparse.Namespace) -> None:
    from .finetune import finetune_image

    cfg = _finetune_config(args, FinetuneConfig())
    result = finetune_image(args.checkpoint, args.train_dataset or args.dataset, args.dataset, args.format,
                            args.class_map, cfg, tuple(args.train_scale), args.dataset_name, args.num_workers,
                            args.device, not args.no_progress)
    _finish(result, args, ("top1", "top5", "mean_per_class_recall"))


@_friendly
def _glue(args: argparse.Namespace) -> None:
    from .glue import finetune_glue

    result = finetune_glue(args.checkpoint, args.data, args.glue_task, _finetune_config(args, GLUE_DEFAULTS),
                           args.max_length, args.dropout, args.num_workers, args.device, not args.no_progress)
    for split, metrics in result["metrics"].items():
        print(f"{args.glue_task} {split}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    _finish(result, args, ("score",))


def register_eval(eval_subparsers: argparse._SubParsersAction) -> None:
    """Add zeroshot, linear-probe, finetune-image and glue next to `eval retrieval`."""
    p = eval_subparsers.add_parser("zeroshot", help="zero-shot classification with prompt templates")
    _dataset_args(p, train=False)
    p.add_argument("--split", default="test", help="CIFAR split (train/test)")
    p.add_argument("--templates", help="file of templates with {c} (default: CLIP's 80 ImageNet / 18 CIFAR ones)")
    _common(p)
    p.set_defaults(func=_zeroshot)

    p = eval_subparsers.add_parser("linear-probe", help="logistic regression on frozen image embeddings")
    _dataset_args(p, train=True)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of train held out to choose L2")
    p.add_argument("--max-iter", type=int_at_least(1), default=1000, help="L-BFGS iterations per fit")
    p.add_argument("--seed", type=int, default=0, help="validation split seed")
    _common(p)
    p.set_defaults(func=_linear_probe)

    image_defaults = FinetuneConfig()
    p = eval_subparsers.add_parser("finetune-image", help="fine-tune the image encoder + a classification head")
    _dataset_args(p, train=True)
    _finetune_args(p, image_defaults)
    p.add_argument("--train-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop scale for training (default 0.08 1.0)")
    _common(p, model_flag=False, batch_flag=False)
    p.set_defaults(func=_finetune_image)

    p = eval_subparsers.add_parser("glue", help="fine-tune the text encoder on a GLUE task (local datasets copy)")
    p.add_argument("--data", required=True, help="the task's DatasetDict folder (datasets' save_to_disk)")
    # dest differs from `task`, the name `unialign eval` stores its subcommand under
    p.add_argument("--task", dest="glue_task", required=True, choices=sorted(GLUE_TASKS))
    _finetune_args(p, GLUE_DEFAULTS)
    p.add_argument("--max-length", type=int_at_least(1), default=128,
                   help="tokens per example (pair) incl. [CLS]/[SEP]")
    p.add_argument("--dropout", type=float, default=0.1, help="before the classification layer")
    _common(p, model_flag=False, batch_flag=False)
    p.set_defaults(func=_glue)


# --------------------------------------------------------------------------------------- report


@_friendly
def _report(args: argparse.Namespace) -> None:
    from .report import build_report

    report = build_report(args.results, args.output)
    print(f"wrote {args.output}/report.md" + (f" and {args.output}/{report['files']['plot']}"
                                             if report["files"]["plot"] else "") + f", {args.output}/report.json")


def register_report(subparsers: argparse._SubParsersAction) -> None:
    """`unialign report RESULTS.json... --output DIR`."""
    p = subparsers.add_parser("report", help="merge result JSONs into a Markdown report with the paper's numbers")
    p.add_argument("results", nargs="+", help="result JSONs written by `unialign eval ...`")
    p.add_argument("--output", required=True, help="directory for report.md, recall_at_k.png, report.json")
    p.set_defaults(func=_report)
