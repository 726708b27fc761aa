"""Loading a run configuration: YAML in, dotted overrides applied, validated, paths resolved
and checked, before any work starts.

A run is described by one YAML file (the paper's recipe is ``configs/paper.yaml``) plus dotted
command-line overrides.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .schema import Config, WebDatasetSource


class ConfigError(ValueError):
    """A configuration problem, reported with the offending key or path."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        got = e.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {e['msg']}{got_text}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    """YAML scalar parsing, plus floats like 1e-4 that YAML 1.1 would leave as strings."""
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (so 1e-4, true, [1,2] work)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = node.setdefault(part, {})
        last = parts[-1]
        value = _parse_value(text)
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {key!r}: parent is not a section")
    return out


def _check_paths(cfg: Config, base: Path) -> None:
    """Resolve relative paths against ``base`` (the working folder) and require inputs to exist."""
    missing: list[str] = []

    def resolve(p: Path | None, key: str) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        if not p.is_absolute():
            p = (base / p).resolve()
        if not p.exists():
            missing.append(f"  {key}: {p} does not exist")
        return p

    for tower, key in ((cfg.model.image, "model.image"), (cfg.teacher, "teacher")):
        tower.checkpoint = resolve(tower.checkpoint, f"{key}.checkpoint")
    # A model folder given as a path (./towers/minilm, /models/bert, or one that exists here) is
    # made absolute like the other paths, so the saved config works from any folder; a missing
    # one is reported here instead of as a failed hub download of "towers/minilm".
    for tower, key in ((cfg.model.image, "model.image"), (cfg.model.text, "model.text"), (cfg.teacher, "teacher")):
        if tower.name.startswith((".", "/", "~")) or (base / tower.name).is_dir():
            tower.name = str(resolve(Path(tower.name), f"{key}.name"))
    if cfg.teacher.cache != "auto":
        cfg.teacher.cache = resolve(cfg.teacher.cache, "teacher.cache")
    cfg.model.init_checkpoint = resolve(cfg.model.init_checkpoint, "model.init_checkpoint")
    sources = [(f"data.train.{i}", s) for i, s in enumerate(cfg.data.train)]
    if cfg.data.val is not None:
        sources.append(("data.val", cfg.data.val))
    for key, src in sources:
        if isinstance(src, WebDatasetSource):
            _check_local_shards(src.urls, f"{key}.urls", missing)
            continue
        src.path = resolve(src.path, f"{key}.path")
        root = getattr(src, "images", None)
        if root is not None:
            src.images = resolve(root, f"{key}.images")
    if missing:
        raise ConfigError("missing files in config:\n" + "\n".join(missing))


def _check_local_shards(urls: str, key: str, missing: list[str]) -> None:
    """Local shard paths must exist; remote URLs (scheme://, pipe:) are checked when read."""
    try:
        import braceexpand  # comes with webdataset (the `train` extra)
    except ImportError:
        raise ConfigError(f"{key}: webdataset sources need the webdataset package: pip install unialign[train]") \
            from None

    for pattern in urls.split("::"):
        if "://" in pattern or pattern.startswith("pipe:"):
            continue
        absent = [p for p in braceexpand.braceexpand(pattern) if not Path(p).expanduser().exists()]
        if absent:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            missing.append(f"  {key}: shard {absent[0]} does not exist{more}")


def parse_config(raw: dict[str, Any], source: str = "<dict>", base: Path | None = None,
                 check_paths: bool = True) -> Config:
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    if check_paths:
        _check_paths(cfg, base or Path.cwd())
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True) -> Config:
    """Read, override and validate a YAML config; relative paths are relative to the cwd."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path), check_paths=check_paths)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (atomically) so a run can be inspected and repeated."""
    from ..files import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
