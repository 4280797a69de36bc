"""One reading of the data: how every stage turns WebDataset shards into samples.

Every stage that reads shards (teacher, synthesize, cache, evaluate) reads them through this module,
so one shard gives the same samples, keys, prompts and pixels everywhere, and a bad shard meets one
policy. Nothing here imports Ray, MLflow or the config; the stages add those.

Rules (pure functions):
- `split_member(name)`: WebDataset's key rule (`webdataset.tariterators.base_plus_ext`): key =
  directory + basename up to its first dot, extension = the rest of the basename, lower-cased
  (`a.b/c.d/000001.txt` -> (`a.b/c.d/000001`, `txt`)); None for a name that is not a sample member.
- `read_caption(raw)`: the prompt of a `txt` member: strict UTF-8, stripped; else the reject
  reason `bad_caption` (not UTF-8) or `empty_caption` (empty or whitespace).
- `square_image(data)`: image bytes -> upright RGB (EXIF orientation applied with
  `PIL.ImageOps.exif_transpose`, as diffusers' training scripts do), centre-cropped to a square
  (PIL image; raises for bytes that are not an image).
- `decode_image(data, side=None)`: `square_image`, resized (bicubic) to side x side when `side` is
  given and differs: uint8 [S, S, 3].
- `bad_fraction(rows, rejects, counted_shards)`: rejected / (kept + rejected)
  samples, an unreadable shard counting as many samples as an average readable shard; what every
  stage's `max_bad_fraction` is compared with.
- `by_reason(rejects)`, `bad_data_problem(...)`: reject counts, and the message of a stage that
  fails on too much bad data (naming the bad shards, the key and the fix), or None.

The tolerant tar reader (why not `ray.data.read_webdataset` or `webdataset.WebDataset`: see
stages/cache/): every tar fault becomes a counted reject, never an exception.
- `scan_tar(fileobj, size)`: walk the headers, find the samples (`Run`s) and the tar faults.
- `judge_runs(scan, url, require_image=True)`: the good samples and one reject per bad one.
- `local_file(url)`: (seekable file, size) of a local path or pyarrow-filesystem URI.
- `iter_shard(url, members=(), require_image=True)`: (sample, None) or (None, reject) in tar order;
  a sample is {key, prompt, image, image_ext, <each of `members`>}; a shard that cannot be read at
  all ends with one `unreadable_shard` reject (its samples already yielded must be dropped).
- `read_shards(urls, ...)`: every sample of some shards, whole shards only, as `ShardReads` (the
  kept samples, every reject, and `bad_fraction` / `metrics(prefix)` of what was read).

Reject entries are {"url", "key", "reason", "detail"}, `reason` one of `REASONS`.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
CAPTION_EXT = "txt"
DEFAULT_MAX_BAD_FRACTION = 0.01  # the default of every stage's max_bad_fraction
# Why a sample or a shard was skipped (counted per reason).
REASONS = {
    "unreadable_shard": "the shard could not be opened or read (not cached: retried next run)",
    "truncated_tar": "the tar ends inside a member or without its end-of-archive blocks",
    "corrupt_tar": "bytes that are not tar headers where a header should be",
    "non_contiguous": "members of one sample are not adjacent in the tar",
    "duplicate_member": "two members of one sample have the same extension",
    "missing_image": f"no {'/'.join(IMAGE_EXTS)} member",
    "not_image": "the image member does not decode as an image",
    "too_small": "the image is smaller than the largest scale's pixel size",
    "missing_caption": f"no {CAPTION_EXT} member",
    "empty_caption": "the caption is empty or only whitespace",
    "bad_caption": "the caption is not UTF-8 text",
}


# ----------------------------------------------------------------------------- rules

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name by WebDataset's rule, the extension lower-cased; None
    when the basename has no dot (or only a leading one): not a member of a sample."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def read_caption(raw: bytes) -> tuple[str | None, str | None, str]:
    """(prompt, None, "") for a usable caption, else (None, reject reason, detail)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, "bad_caption", str(e)
    text = text.strip()
    return (text, None, "") if text else (None, "empty_caption", "")


def square_image(data: bytes):
    """Image bytes -> upright (EXIF orientation) RGB PIL image, centre-cropped to a square."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")  # camera JPEGs: upright, as diffusers' scripts do
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    if image.size != (side, side):
        image = image.crop((left, top, left + side, top + side))
    return image


def decode_image(data: bytes, side: int | None = None):
    """`square_image`, resized bicubic to side x side when given: uint8 numpy [S, S, 3]."""
    import numpy as np
    from PIL import Image

    image = square_image(data)
    if side is not None and image.size != (side, side):
        image = image.resize((side, side), Image.BICUBIC)
    return np.asarray(image)


def by_reason(rejects: list[dict]) -> dict[str, int]:
    """Reject counts per reason, in `REASONS` order (reasons with no reject left out)."""
    counts = {r: sum(1 for e in rejects if e["reason"] == r) for r in REASONS}
    return {r: n for r, n in counts.items() if n}


def bad_fraction(rows: int, rejects: list[dict], counted_shards: int) -> float:
    """Rejected / (kept + rejected) samples.

    `rows` kept samples and the sample rejects come from `counted_shards` readable shards; an
    unreadable shard counts as many samples as such a shard holds on average (at least 1). Samples
    lost after a truncation are unknown."""
    unreadable = sum(1 for e in rejects if e["reason"] == "unreadable_shard")
    per_shard = max(1.0, (rows + len(rejects) - unreadable) / max(1, counted_shards))
    bad = len(rejects) - unreadable + unreadable * per_shard
    return bad / max(1.0, rows + bad)


def bad_data_problem(stage: str, what: str, fraction: float, max_bad_fraction: float, rejects: list[dict],
                     key: str | None, fix: str = "") -> str | None:
    """None when `fraction` is within `max_bad_fraction`, else the stage's error message: the
    fraction, the limit and its key, every bad shard (unreadable ones first, then those with
    rejected samples), the rejects by reason and what to do."""
    if fraction <= max_bad_fraction:
        return None
    unreadable = [e for e in rejects if e["reason"] == "unreadable_shard"]
    shards = [f"{e['url']} (unreadable: {e['detail']})" for e in unreadable]
    partial: dict[str, int] = {}
    for e in rejects:
        if e["reason"] != "unreadable_shard":
            partial[e["url"]] = partial.get(e["url"], 0) + 1
    shards += [f"{url} ({n} rejected sample(s))" for url, n in partial.items()]
    shown = "; ".join(shards[:10]) + (f"; ... {len(shards) - 10} more" if len(shards) > 10 else "")
    limit = f"{key}={max_bad_fraction}" if key else f"the allowed {max_bad_fraction}"
    raise_it = f", or raise {key}" if key else ""
    return (f"{stage}: {fraction:.2%} of the {what} are bad, more than {limit} ({len(unreadable)} unreadable "
            f"shard(s), {len(rejects) - len(unreadable)} rejected sample(s); by reason {by_reason(rejects)}); "
            f"bad shards: {shown}. Fix or remove the bad shards{raise_it}{fix}")


# ----------------------------------------------------------------------------- the tolerant tar reader

_BLOCK = 512


@dataclass
class Run:
    """A contiguous run of tar members with the same key (one sample, if the tar is well formed)."""
    key: str
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    start: int = 0  # offset of its first header
    end: int = 0  # offset after its last member's (padded) data
    duplicate: bool = False


@dataclass
class Scan:
    runs: list[Run]
    faults: list[tuple[int, str, str]]  # (offset, reason, detail) of tar-level faults
    truncated_members: set[str]  # names of members whose data runs past the end of the file


def scan_tar(fileobj, size: int) -> Scan:
    """Walk a tar's headers (seeking over the data) and find the samples and the faults.

    `ignore_zeros=True` makes tarfile step over blocks that are not valid headers one at a time,
    so it resynchronises on the next good header after a corrupt region; the regions skipped are
    found afterwards as non-zero gaps between members.
    """
    members: list[tarfile.TarInfo] = []
    faults: list[tuple[int, str, str]] = []
    stopped = None
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:", ignore_zeros=True)
        for m in tar:
            members.append(m)
    except Exception as e:  # a truncated header or data, a bad extended header: keep what came before
        stopped = f"{type(e).__name__}: {e}"
    truncated: set[str] = set()
    pos = 0
    for m in members:
        if m.offset > pos and not _zeros(fileobj, pos, m.offset):
            faults.append((pos, "corrupt_tar", f"{m.offset - pos} bytes that are not tar headers at offset {pos}"))
        if m.offset_data + m.size > size:
            truncated.add(m.name)
            faults.append((m.offset, "truncated_tar", f"member {m.name!r} ends past the end of the file "
                                                      f"({size} bytes)"))
        pos = max(pos, m.offset_data + (m.size + _BLOCK - 1) // _BLOCK * _BLOCK)
    # What follows the last member: a tar ends with zero blocks (two, padded to a record).
    if not truncated:
        if pos >= size:  # cut exactly after a member: whatever followed is gone
            faults.append((pos, "truncated_tar", f"ends right after a member at offset {pos}, without "
                                                 f"end-of-archive blocks"))
        elif stopped is not None or not _zeros(fileobj, pos, size):
            # A partial header (the file was cut inside it) or bytes that are not headers.
            reason = "truncated_tar" if members and (size % _BLOCK or stopped) else "corrupt_tar"
            where = f"after the last member at offset {pos}" if members else "of the file"
            faults.append((pos, reason, stopped or f"{size - pos} bytes {where} are not tar headers"))

    runs: list[Run] = []
    for m in members:
        split = split_member(m.name)
        if not m.isreg() or split is None:
            continue
        key, ext = split
        if not runs or runs[-1].key != key:
            runs.append(Run(key, start=m.offset))
        run = runs[-1]
        if m.name in truncated:  # the sample is there, its cut member is not
            run.end = size
            continue
        run.duplicate |= ext in run.members
        run.members.setdefault(ext, m)
        run.end = m.offset_data + (m.size + _BLOCK - 1) // _BLOCK * _BLOCK
    return Scan(runs, faults, truncated)


def _zeros(f, start: int, end: int) -> bool:
    f.seek(start)
    left = end - start
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            return True  # past the end of the file: checked by the caller
        if chunk.strip(b"\0"):
            return False
        left -= len(chunk)
    return True


def judge_runs(scan: Scan, url: str, require_image: bool = True) -> tuple[list[Run], list[dict]]:
    """The good samples of a scanned shard and one reject entry per bad one (or per fault that
    took no sample with it). A fault is blamed on the incomplete sample next to it, if any. A
    sample needs a caption, and an image unless `require_image` is false (prompt-only shards)."""
    rejected: dict[str, dict] = {}

    def reject(key: str, reason: str, detail: str) -> None:
        rejected.setdefault(key, {"url": url, "key": key, "reason": reason, "detail": detail})

    def has_image(run: Run) -> bool:
        return any(e in run.members for e in IMAGE_EXTS)

    def complete(run: Run) -> bool:
        return (has_image(run) or not require_image) and CAPTION_EXT in run.members

    for offset, reason, detail in scan.faults:
        before = [r for r in scan.runs if r.end <= offset or r.start <= offset < r.end]
        after = [r for r in scan.runs if r.start >= offset]
        near = ([before[-1]] if before else []) + ([after[0]] if after else [])
        blamed = [r for r in near if not complete(r) and r.key not in rejected]
        for r in blamed:
            reject(r.key, reason, detail)
        if not blamed:
            reject(f"{url}@{offset}", reason, detail)
    seen: dict[str, int] = {}
    for r in scan.runs:
        seen[r.key] = seen.get(r.key, 0) + 1
    good = []
    for r in scan.runs:
        if r.key in rejected:
            continue
        if seen[r.key] > 1:
            reject(r.key, "non_contiguous", f"members of {r.key!r} are in {seen[r.key]} separate places in the tar")
        elif r.duplicate:
            reject(r.key, "duplicate_member", f"members {sorted(r.members)} with a repeated extension")
        elif require_image and not has_image(r):
            reject(r.key, "missing_image", f"members {sorted(r.members)}")
        elif CAPTION_EXT not in r.members:
            reject(r.key, "missing_caption", f"members {sorted(r.members)}")
        else:
            good.append(r)
    return good, list(rejected.values())


@contextmanager
def local_file(url: str) -> Iterator[tuple[Any, int]]:
    """(seekable file, size) of a shard: a local path directly, a remote URI copied to a temp file."""
    if "://" not in url:
        with open(url, "rb") as f:
            yield f, os.fstat(f.fileno()).st_size
        return
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(url)
    with tempfile.TemporaryFile() as tmp:
        with fs.open_input_stream(path) as src:
            while chunk := src.read(8 << 20):
                tmp.write(chunk)
        size = tmp.tell()
        tmp.seek(0)
        yield tmp, size


def iter_shard(url: str, members: tuple[str, ...] = (), require_image: bool = True
               ) -> Iterator[tuple[dict | None, dict | None]]:
    """Every sample and reject of one shard, in tar order (the tar-level rejects first): (sample,
    None) or (None, reject entry). A sample is {key, prompt, image (bytes, undecoded; None for a
    sample without one when `require_image` is false), image_ext, and each extension of `members`
    (bytes or None)}. Never raises: a shard that cannot be read ends with one `unreadable_shard`
    reject, and the caller drops the samples it already got from that shard."""
    try:
        with local_file(url) as (f, size):
            good, rejects = judge_runs(scan_tar(f, size), url, require_image)
            for entry in rejects:
                yield None, entry
            for run in good:
                caption = run.members[CAPTION_EXT]
                f.seek(caption.offset_data)
                prompt, reason, detail = read_caption(f.read(caption.size))
                if reason is not None:
                    yield None, {"url": url, "key": run.key, "reason": reason, "detail": detail}
                    continue
                ext = next((e for e in IMAGE_EXTS if e in run.members), None)
                image = None
                if ext is not None:
                    f.seek(run.members[ext].offset_data)
                    image = f.read(run.members[ext].size)
                sample = {"key": run.key, "prompt": prompt, "image": image, "image_ext": ext}
                for name in members:
                    info = run.members.get(name)
                    if info is not None:
                        f.seek(info.offset_data)
                    sample[name] = f.read(info.size) if info is not None else None
                yield sample, None
    except Exception as e:  # OSError, or anything tarfile raises on bytes it does not expect
        yield None, {"url": url, "key": url, "reason": "unreadable_shard", "detail": f"{type(e).__name__}: {e}"}


@dataclass
class ShardReads:
    """What `read_shards` read: the kept samples and every reject of the shards it read."""
    samples: list[dict]
    rejects: list[dict]
    shards_read: int  # shards opened (whole), unreadable ones included
    rows_read: int  # kept samples in those shards (before any `max_samples` cut)

    @property
    def unreadable(self) -> list[dict]:
        return [e for e in self.rejects if e["reason"] == "unreadable_shard"]

    @property
    def bad_fraction(self) -> float:
        return bad_fraction(self.rows_read, self.rejects, self.shards_read - len(self.unreadable))

    def metrics(self, prefix: str) -> dict[str, float]:
        """Counts for a stage's MLflow run and summary: <prefix>shards_read, unreadable_shards,
        rejects, bad_fraction, and rejects_<reason> per reason seen."""
        return {f"{prefix}shards_read": self.shards_read, f"{prefix}unreadable_shards": len(self.unreadable),
                f"{prefix}rejects": len(self.rejects), f"{prefix}bad_fraction": round(self.bad_fraction, 6),
                **{f"{prefix}rejects_{r}": n for r, n in by_reason(self.rejects).items()}}


def read_shards(urls: list[str], members: tuple[str, ...] = (), require_image: bool = True,
                decode: Callable[[bytes], Any] | None = None, max_samples: int | None = None) -> ShardReads:
    """The samples of `urls` in order (each shard read whole, through `iter_shard`), until
    `max_samples` are kept. `decode(image bytes)` runs on each sample's image: a result other than
    None is kept as sample["pixels"]; raising makes the sample a `not_image` reject."""
    kept: list[dict] = []
    rejects: list[dict] = []
    shards = rows = 0
    for url in urls:
        if max_samples is not None and len(kept) >= max_samples:
            break
        shards += 1
        mine: list[dict] = []
        mine_rejected: list[dict] = []
        for sample, entry in iter_shard(url, members, require_image):
            if entry is not None:
                if entry["reason"] == "unreadable_shard":  # the shard counts as one unreadable shard, nothing else
                    mine, mine_rejected = [], []
                mine_rejected.append(entry)
                continue
            if decode is not None and sample["image"] is not None:
                try:
                    pixels = decode(sample["image"])
                except Exception as e:  # PIL raises many types for bytes that are not an image
                    mine_rejected.append({"url": url, "key": sample["key"], "reason": "not_image",
                                          "detail": f"{sample['image_ext']}: {type(e).__name__}: {e}"[:300]})
                    continue
                if pixels is not None:
                    sample["pixels"] = pixels
            mine.append(sample)
        rows += len(mine)
        kept += mine
        rejects += mine_rejected
    if max_samples is not None:
        kept = kept[:max_samples]
    return ShardReads(kept, rejects, shards, rows)
