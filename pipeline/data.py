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


# ----------------------------------------------------------------------------- prompt files

PROMPT_FILE_FORMATS = (".txt", ".parquet", ".csv")


class PromptFileError(ValueError):
    """A prompt file that cannot be read as one: the message names the config key and the fix."""


def read_prompt_values(spec: str, column: str, key: str, column_key: str) -> list[str]:
    """Every prompt of a prompt file, stripped, in order (empty ones kept: the caller decides): `.txt` one
    per line (a final newline is not a prompt), or the `column` of a `.csv` / `.parquet` file; a local path
    or a pyarrow-filesystem URI. `key` / `column_key` are the config keys the errors name (e.g.
    `data.prompts` / `data.prompt_column`). The synthesize stage and the evaluate stage's prompt set read
    their files with it."""
    suffix = Path(spec.split("?", 1)[0]).suffix.lower()
    if suffix not in PROMPT_FILE_FORMATS:
        raise PromptFileError(f"{key}: {spec!r}: unknown format {suffix or '(no suffix)'!r}; expected one of "
                              f"{', '.join(PROMPT_FILE_FORMATS)}")
    try:
        with open_binary(spec) as f:
            raw = f.read()
    except OSError as e:
        raise PromptFileError(f"{key}: {spec!r} cannot be read ({e.strerror or e}); give an existing prompt "
                              f"file") from None
    if suffix == ".txt":
        lines = raw.decode("utf-8", errors="replace").splitlines()
        values = lines[:-1] if lines and not lines[-1].strip() else lines
    elif suffix == ".csv":
        import csv
        import io

        reader = csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace")))
        if column not in (reader.fieldnames or []):
            raise PromptFileError(f"{column_key}: {column!r} is not a column of {spec} (columns: "
                                  f"{reader.fieldnames}); set {column_key}")
        values = [row[column] or "" for row in reader]
    else:
        import io

        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(raw))
        if column not in table.column_names:
            raise PromptFileError(f"{column_key}: {column!r} is not a column of {spec} (columns: "
                                  f"{table.column_names}); set {column_key}")
        values = ["" if v is None else str(v) for v in table.column(column).to_pylist()]
    return [v.strip() for v in values]


def open_binary(spec: str):
    """A local path or a pyarrow-filesystem URI, as a binary file object."""
    if "://" not in spec:
        return open(os.path.expanduser(spec), "rb")
    fs, path = pafs.FileSystem.from_uri(spec)
    return fs.open_input_stream(path)
