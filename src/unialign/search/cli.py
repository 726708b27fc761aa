"""`unialign index build`, `unialign search` and `unialign serve` (wired in by unialign.cli).

Heavy imports (torch, faiss, fastapi) happen inside the commands, so `register` keeps
`unialign --help` fast.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from ..cli import int_at_least


def _fail(err: Exception) -> SystemExit:
    return SystemExit(f"unialign: error: {err}")


def _index_build(args: argparse.Namespace) -> None:
    from ..data.records import DataError
    from .build import build_index, entries_from_folder, entries_from_manifest
    from .store import DB_NAME, SearchIndexError

    if args.manifest is None and args.images is None:
        raise SystemExit("unialign index build: give --images FOLDER or --manifest FILE")
    try:
        entries = (entries_from_manifest(args.manifest, args.images) if args.manifest
                   else entries_from_folder(args.images))
        report = build_index(args.checkpoint, entries, args.output, index_type=args.index_type,
                             batch_size=args.batch_size, num_workers=args.num_workers, chunk_size=args.chunk_size,
                             device=args.device, progress=not args.no_progress, query_bank=args.query_bank)
    except (SearchIndexError, DataError) as err:
        raise _fail(err) from None
    for path, reason in report.skipped:
        print(f"skipped: {path}: {reason}", file=sys.stderr)
    print(f"{report.index_dir}: {report.added} image(s) and {report.captions_added} caption(s) embedded, "
          f"{report.already_indexed} already indexed, {len(report.skipped)} skipped"
          + (f" (listed in table 'skipped' of {Path(report.index_dir) / DB_NAME})" if report.skipped else ""))
    print(f"index now holds {report.items} image(s) [{report.image_index}]"
          + (f" and {report.captions} caption(s) [{report.caption_index}]" if report.caption_index else "")
          + (f"; text search normalised by a query bank of {report.query_bank} queries" if report.query_bank else ""))


def _search(args: argparse.Namespace) -> None:
    from ..data.images import ImageLoadError, load_image
    from .query import Searcher
    from .store import SearchIndexError

    if (args.query is None) == (args.image is None):
        raise SystemExit("unialign search: give either a text QUERY or --image PATH (not both)")
    if args.query is not None and not args.query.strip():
        raise SystemExit("unialign search: the text QUERY is empty (give some words, or --image PATH)")
    if args.image and args.captions:
        raise SystemExit("unialign search: --captions searches captions with a text QUERY, not with --image")
    if args.rerank and (args.image or args.captions):
        raise SystemExit("unialign search: --rerank re-ranks a text QUERY's images, not --image or --captions")
    try:
        searcher = Searcher(args.index, checkpoint=args.checkpoint, device=args.device, nprobe=args.nprobe,
                            ef_search=args.ef_search)
        if args.image:
            hits = searcher.search_image(load_image(args.image), args.k)
        elif args.captions:
            hits = searcher.search_captions(args.query.strip(), args.k)
        else:
            hits = searcher.search_text(args.query.strip(), args.k, rerank=args.rerank)
    except (SearchIndexError, ImageLoadError) as err:
        raise _fail(err) from None
    if args.json:
        print(json.dumps([h.as_dict() for h in hits], indent=2, ensure_ascii=False))
    else:
        print(format_table([h.as_dict() for h in hits]))


def format_table(rows: list[dict[str, Any]]) -> str:
    """rank | score | path | caption, with the caption cut to the terminal width."""
    if not rows:
        return "no results"
    path_w = max(4, *(len(r["path"]) for r in rows))
    head = f"{'rank':>4}  {'score':>6}  {'path':<{path_w}}  caption"
    room = max(20, shutil.get_terminal_size((120, 20)).columns - len(head) + len("caption"))
    lines = [head, "-" * min(len(head) + room - len("caption"), 200)]
    for r in rows:
        caption = r["caption"] or ""
        if len(caption) > room:
            caption = caption[:room - 1] + "…"
        lines.append(f"{r['rank']:>4}  {r['score']:>6.3f}  {r['path']:<{path_w}}  {caption}")
    return "\n".join(lines)


def _serve(args: argparse.Namespace) -> None:
    from .app import Limits, serve
    from .store import SearchIndexError

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_query_chars=args.max_query_chars,
                    max_k=args.max_k)
    try:
        serve(args.index, host=args.host, port=args.port, checkpoint=args.checkpoint, device=args.device,
              limits=limits, nprobe=args.nprobe, ef_search=args.ef_search,
              allowed_hosts=[h for group in args.allowed_host or [] for h in group.split(",") if h.strip()])
    except SearchIndexError as err:
        raise _fail(err) from None


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="model file (default: the one the index was built with; must be the same model)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--nprobe", type=int_at_least(1), default=None, help="IVF lists scanned per query")
    p.add_argument("--ef-search", type=int_at_least(1), default=None, help="HNSW candidates per query")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `index`, `search` and `serve` commands to the `unialign` parser."""
    p = subparsers.add_parser("index", help="build a searchable index of an image collection")
    index_sub = p.add_subparsers(dest="index_command", required=True)
    b = index_sub.add_parser("build",
                             help="embed images (only new ones when OUTPUT exists) into a FAISS + SQLite index")
    b.add_argument("--checkpoint", required=True)
    b.add_argument("--images", help="folder of images to index (searched recursively); with --manifest, the folder "
                                    "its relative image paths start from (default: the manifest's folder)")
    b.add_argument("--manifest", help="JSONL/CSV with image, caption (and image_id) columns; captions become "
                                      "searchable with `search --captions`")
    b.add_argument("--output", required=True, help="index directory (created, or updated incrementally)")
    b.add_argument("--index-type", choices=["auto", "flat", "ivf", "hnsw"], default=None,
                   help="FAISS index (default: keep the index's type; auto for a new one = exact up to 50,000 "
                        "vectors, IVF above)")
    b.add_argument("--batch-size", type=int_at_least(1), default=64)
    b.add_argument("--num-workers", type=int_at_least(0), default=0)
    b.add_argument("--chunk-size", type=int_at_least(1), default=2048,
                   help="images embedded per committed chunk (what an interruption can lose)")
    b.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--query-bank", metavar="FILE",
                   help="texts like the queries to expect (the training captions: a .txt, one a line, or a "
                        "JSONL/CSV manifest): text search then ranks by query-bank normalisation, which keeps "
                        "images that match every query from crowding the top (docs/SEARCH.md); kept for later builds")
    b.set_defaults(func=_index_build)

    p = subparsers.add_parser("search", help="query an index with a text or an image")
    p.add_argument("query", nargs="?", help="text query, e.g. \"a dog on the beach\"")
    p.add_argument("--index", required=True)
    p.add_argument("--image", help="query image file (image-to-image search)")
    p.add_argument("--captions", action="store_true", help="match the text against indexed captions")
    p.add_argument("-k", type=int_at_least(1), default=10, help="number of results")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--rerank", type=int_at_least(0), default=0, metavar="N",
                   help="re-order the top max(k, N) images with the model's ITM head (model.itm; default 0: off)")
    _model_args(p)
    p.set_defaults(func=_search)

    p = subparsers.add_parser("serve", help="web page + JSON API over an index")
    p.add_argument("--index", required=True)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; anything else is public)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-host", action="append", metavar="HOST[,HOST...]",
                   help="also answer requests whose Host header is HOST (repeatable; default: only localhost, "
                        "127.0.0.1, ::1 and --host; '*' answers any host, which allows DNS rebinding)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted query image")
    p.add_argument("--max-query-chars", type=int_at_least(1), default=512)
    p.add_argument("--max-k", type=int_at_least(1), default=100)
    _model_args(p)
    p.set_defaults(func=_serve)
