"""The latent cache's format: what the cache stage writes and distill, the benchmarks and
`pipeline/tiny.py` read.

A committed cache stage output holds `cache.json` (its manifest: per shard its directory and row
count, rejects by reason, the encoder's identity and text settings). Each shard directory holds
Parquet files, one row per sample: `key`, `prompt`, `shard_key`, and per tensor (`tensor_names`: z_i
and z_im1_i per scale index i, then `prompt_embeds`, `pooled_prompt_embeds`) three columns: `<name>`
(little-endian bytes, bfloat16 as its raw bits), `<name>_shape` (without the batch dimension) and
`<name>_dtype`. `read_cache` opens it as a Ray Dataset; `decode_batch` turns rows back into tensors.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

CACHE_FILE = "cache.json"
FORMAT_VERSION = 1  # of the per-shard Parquet layout below; part of every shard key
ENCODER_PARTS = ("vae/", "text_encoder", "tokenizer", "model_index.json", "swd_teacher.json")


def vae_scale_factor(directory: str | Path) -> int:
    """2 ** (number of VAE blocks - 1), as StableDiffusion3Pipeline computes it."""
    config = json.loads((Path(directory) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def encoder_digest(directory: str | Path) -> str:
    """A digest of every file the encoders read: VAE, text encoders, tokenizers (not the transformer)."""
    from pipeline.teacher import directory_digest

    files = [f for f in directory_digest(Path(directory)) if f[0].startswith(ENCODER_PARTS)]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def transport_dtype(dtype: str):
    """numpy dtype that carries pixels of a torch dtype between Ray tasks (bf16 as its int16 bits)."""
    import numpy as np

    return {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}[dtype]


def to_numpy(x, dtype: str):
    """torch tensor -> numpy in `dtype`; bfloat16 as its raw bits (numpy and Arrow have no bf16)."""
    import torch

    x = x.to(getattr(torch, dtype)).contiguous()
    return (x.view(torch.int16) if dtype == "bfloat16" else x).numpy()


def from_numpy(a, dtype: str):
    import torch

    t = torch.from_numpy(a if a.flags.writeable else a.copy())
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def tensor_names(num_scales: int) -> list[str]:
    """Tensor columns of a cache row: z_i and z_im1_i per scale index i, then the text embeddings."""
    return ([f"z_{i}" for i in range(num_scales)] + [f"z_im1_{i}" for i in range(num_scales)]
            + ["prompt_embeds", "pooled_prompt_embeds"])


def rows_table(keys: list[str], prompts: list[str], shard_keys: list[str], tensors: dict, names: list[str]):
    """One cache row per sample: key, prompt, shard_key, and per tensor: bytes, shape, dtype."""
    import pyarrow as pa

    columns: dict[str, pa.Array] = {"key": pa.array(keys, pa.string()), "prompt": pa.array(prompts, pa.string()),
                                    "shard_key": pa.array(shard_keys, pa.string())}
    for name in names:
        t = tensors.get(name)
        if t is None:
            data, shapes, dtypes = [], [], []
        else:
            data, shape, dtype = tensor_bytes(t.cpu())
            shapes, dtypes = [shape] * len(keys), [dtype] * len(keys)
        columns[name] = pa.array(data, pa.binary())
        columns[f"{name}_shape"] = pa.array(shapes, pa.list_(pa.int32()))
        columns[f"{name}_dtype"] = pa.array(dtypes, pa.string())
    return pa.table(columns)


def tensor_bytes(batch_tensor) -> tuple[list[bytes], list[int], str]:
    """[B, ...] tensor -> (B little-endian byte strings, per-row shape, dtype name); bfloat16 as raw bits."""
    import torch

    t = batch_tensor.contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    array = raw.numpy()
    if sys.byteorder == "big":
        array = array.byteswap()
    return [array[b].tobytes() for b in range(array.shape[0])], list(t.shape[1:]), dtype


def read_manifest(cache_dir: str | Path) -> dict:
    """The `cache.json` of a committed cache stage output."""
    return json.loads((Path(cache_dir) / CACHE_FILE).read_text())


def read_cache(cache_dir: str | Path, columns: list[str] | None = None, **read_parquet_args):
    """The cache as a `ray.data.Dataset` (`ray.data.read_parquet` over every listed shard dir that
    holds rows). `columns` prunes the read, e.g. one scale: ["key", "z_2", "z_2_shape", "z_2_dtype", ...]."""
    import ray

    manifest = read_manifest(cache_dir)
    dirs = [e["dir"] for e in manifest["shards"] if e["rows"]]
    if not dirs:
        raise ValueError(f"cache {cache_dir}: no rows (rejects by reason: {manifest['rejects_by_reason']})")
    ds = ray.data.read_parquet(dirs, file_extensions=["parquet"], partitioning=None, **read_parquet_args)
    return ds.select_columns(columns) if columns else ds
_NUMPY_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<i2", "float64": "<f8"}


def decode_tensor(data: bytes, shape, dtype: str):
    """One stored tensor back to torch (bfloat16 from its raw 2-byte pattern)."""
    import numpy as np
    import torch

    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"cache tensor dtype {dtype!r} is not one of {sorted(_NUMPY_DTYPES)}")
    t = torch.from_numpy(np.frombuffer(data, dtype=_NUMPY_DTYPES[dtype]).copy())
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.reshape([int(s) for s in shape])


def decode_row(row: dict) -> dict:
    """A cache row (dict) -> {"key", "prompt", <tensor name>: tensor without a batch dim}."""
    out: dict[str, Any] = {k: row[k] for k in ("key", "prompt") if k in row}
    for name in _tensor_columns(row):
        out[name] = decode_tensor(row[name], row[f"{name}_shape"], row[f"{name}_dtype"])
    return out


def decode_batch(batch) -> dict:
    """A batch of cache rows (Ray Data numpy or pandas batch, pyarrow table, or dict of lists) ->
    {"key": [...], "prompt": [...], "z": [[B, C, s_i, s_i] per scale], "z_im1": [...],
    "prompt_embeds": [B, L, D], "pooled_prompt_embeds": [B, P], and every tensor column by name}."""
    import torch

    if hasattr(batch, "to_pydict"):  # pyarrow
        batch = batch.to_pydict()
    elif hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        batch = {c: list(batch[c]) for c in batch.columns}
    out: dict[str, Any] = {k: [str(v) for v in batch[k]] for k in ("key", "prompt") if k in batch}
    for name in _tensor_columns(batch):
        columns = zip(batch[name], batch[f"{name}_shape"], batch[f"{name}_dtype"])
        tensors = [decode_tensor(d, s, t) for d, s, t in columns]
        out[name] = torch.stack(tensors) if tensors else torch.empty(0)
    scales = sorted(int(n[2:]) for n in out if re.fullmatch(r"z_\d+", n))
    if scales:
        out["z"] = [out[f"z_{i}"] for i in scales]
        if all(f"z_im1_{i}" in out for i in scales):
            out["z_im1"] = [out[f"z_im1_{i}"] for i in scales]
    return out


def _tensor_columns(batch) -> list[str]:
    return [k[: -len("_dtype")] for k in batch if k.endswith("_dtype") and k[: -len("_dtype")] in batch]
