"""Shard lists: expand user patterns (paths, globs, braces, pyarrow-filesystem URIs) and read the
`shards` stage's output, which every downstream stage uses to find its data."""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from pathlib import Path

import pyarrow.fs as pafs
from braceexpand import braceexpand

SHARDS_FILE = "shards.json"
SPLITS = ("train", "eval")


class ShardError(ValueError):
    pass


def expand_shards(spec: str | list[str], key: str) -> list[dict]:
    """Every tar the patterns name, as [{"url", "size_bytes", "mtime_ns"}], sorted by url.

    Raises ShardError listing each pattern that matched nothing (what was looked for), so a typo
    never turns into an empty dataset.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise ShardError(f"{key}: empty list; give paths, globs, brace patterns or URIs of .tar shards")
    found: dict[str, dict] = {}
    missing: list[str] = []
    for pattern in patterns:
        hits = [h for p in braceexpand(pattern) for h in _match(p)]
        if not hits:
            missing.append(pattern)
        for hit in hits:
            found[hit["url"]] = hit
    if missing:
        looked = "; ".join(f"{m!r} (looked for {', '.join(_shown(m))})" for m in missing)
        raise ShardError(f"{key}: no shard found for {looked}")
    empty = [u for u, h in found.items() if h["size_bytes"] == 0]
    if empty:
        raise ShardError(f"{key}: empty shard file(s): {', '.join(empty[:5])}")
    return [found[u] for u in sorted(found)]


def shard_urls(shards_output_dir: str | Path, split: str) -> list[str]:
    """The shard urls of one split, as recorded by the `shards` stage (relative paths resolved)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    root = Path(shards_output_dir)
    entries = json.loads((root / SHARDS_FILE).read_text())[split]
    return [e["url"] if "://" in e["url"] or os.path.isabs(e["url"]) else str(root / e["url"]) for e in entries]


def _match(pattern: str) -> list[dict]:
    if "://" not in pattern:
        paths = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        return [{"url": os.path.abspath(p), "size_bytes": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns}
                for p in paths if os.path.isfile(p)]
    # Remote: magic is honoured in the last path component (s3://bucket/shards/train-*.tar).
    scheme = pattern.split("://", 1)[0]
    parent, _, name = pattern.rpartition("/")
    if glob.has_magic(name) and not glob.has_magic(parent):
        fs, parent_path = pafs.FileSystem.from_uri(parent)
        infos = fs.get_file_info(pafs.FileSelector(parent_path, allow_not_found=True))
        infos = [i for i in infos if fnmatch.fnmatch(i.base_name, name)]
    else:
        fs, path = pafs.FileSystem.from_uri(pattern)
        infos = [fs.get_file_info(path)]
    return [{"url": f"{scheme}://{i.path}", "size_bytes": i.size, "mtime_ns": i.mtime_ns}
            for i in infos if i.type == pafs.FileType.File]


def _shown(pattern: str) -> list[str]:
    expanded = list(braceexpand(pattern))
    shown = [os.path.abspath(p) if "://" not in p else p for p in expanded[:3]]
    return shown + ([f"... {len(expanded) - 3} more"] if len(expanded) > 3 else [])
