"""Step 1 of the cache stage: what a train shard's cached latents depend on, as its key.

A shard's key is a digest of its url, size and mtime, the encoder identity (bundle location, a
digest of the files the encoders read, the settings that change their output), the scales and the
cache format version. The shared dir holds one directory per committed key:
`<shared>/<key>/shard.json` (written last: the shard counts as committed once it is there) and
`<shared>/<key>/data/*.parquet`. Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.latent_cache import FORMAT_VERSION, encoder_digest

SHARD_FILE = "shard.json"  # a shard directory counts as committed once this is there
DATA_DIR = "data"  # the Parquet files of one shard: <shared>/<shard key>/data/*.parquet


@dataclass
class EncoderSpec:
    """What the encoder actors need to know, and what decides the bytes they produce."""
    location: str
    dtype: str
    device: str
    load_t5: bool | str
    local_files_only: bool
    posterior: str
    seed: int
    storage_dtype: str
    scales: list[int]
    vae_scale_factor: int
    max_sequence_length: int | None = None  # T5 tokens (pipeline.teacher.text_settings; None: the teacher's)

    @property
    def pixel_sides(self) -> list[int]:
        return [s * self.vae_scale_factor for s in self.scales]


@dataclass
class Shard:
    url: str
    size_bytes: int | None = None
    mtime_ns: int | None = None
    error: str | None = None  # why it could not be looked at
    key: str | None = None


def encoder_identity(directory: str | Path, spec: EncoderSpec) -> dict:
    """Bundle location and a digest of every file the encoders read (the transformer is not one of
    them), plus the settings that change their output."""
    return {"location": str(directory), "digest": encoder_digest(directory),
            "dtype": spec.dtype, "load_t5": spec.load_t5, "max_sequence_length": spec.max_sequence_length,
            "posterior": spec.posterior,
            "seed": spec.seed if spec.posterior == "sample" else None, "storage_dtype": spec.storage_dtype}


def stat_shard(url: str) -> Shard:
    """Size and modification time of a local path or pyarrow-filesystem URI."""
    try:
        if "://" not in url:
            st = os.stat(url)
            return Shard(url, st.st_size, st.st_mtime_ns)
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(url)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return Shard(url, error=f"not a file ({info.type})")
        return Shard(url, info.size, info.mtime_ns)
    except (OSError, ValueError) as e:
        return Shard(url, error=f"{type(e).__name__}: {e}")


def shard_key(shard: Shard, identity: dict, spec: EncoderSpec) -> str:
    payload = {"format": FORMAT_VERSION, "url": shard.url, "size": shard.size_bytes, "mtime_ns": shard.mtime_ns,
               "encoder": identity, "scales": spec.scales, "vae_scale_factor": spec.vae_scale_factor}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def is_committed(shared: Path, key: str) -> bool:
    return (shared / key / SHARD_FILE).is_file()
