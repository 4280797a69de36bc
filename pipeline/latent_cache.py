"""The latent cache's format: what the cache stage writes and distill, the benchmarks and
`pipeline/tiny.py` read.

A committed cache stage output holds `cache.json` (its manifest: per shard its directory and row
count, rejects by reason, the encoder's identity and text settings, the stored `columns`, the
`implied_columns`, the `text_layout`) and `uncond.safetensors` (the prompt "" encoded once:
`read_uncond`). Each shard directory holds Parquet files, one row per sample: `key`, `prompt`,
`shard_key`, and per stored tensor (`stored_columns(scales)`) three columns: `<name>` (little-endian
bytes, bfloat16 as its raw bits), `<name>_shape` (without the batch dimension) and `<name>_dtype`.
`read_cache` opens it as a Ray Dataset; `decode_batch` turns rows back into the tensors of every
name in `tensor_names` (z_i and z_im1_i per scale index i, `prompt_embeds`, `pooled_prompt_embeds`),
exactly as the encoders made them:

- z_im1_i is E(area(I_i -> pixels of s[i-1])) with s[-1] := s[0]. Where s[i-1] == s[i] (always at
  i = 0) area is the identity and z_im1_i == z_i: such columns are not stored (`implied_columns`);
  `decode_batch` fills them with the z_i tensor itself.
- prompt_embeds (StableDiffusion3Pipeline.encode_prompt: the CLIP-L and CLIP-G hidden states side by
  side, zero-padded to the joint width, then the T5 tokens, or zeros when there is no T5) is stored
  packed (`TextLayout`): its bytes are the CLIP block [clip_tokens, clip_width] at its own width,
  then the T5 block [t5_tokens, width] only when a T5 encoder made it; its `_shape` is
  [tokens, width, clip_tokens, clip_width]. The writer checks that what it leaves out is zero bit for
  bit, so reading back (zero pad + concat) gives the encoder's tensor exactly. A 2-entry `_shape`
  is a plain tensor (a writer that did not pack).

Format 1 (before): every z_im1_i stored, prompt_embeds dense [tokens, width].
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CACHE_FILE = "cache.json"
UNCOND_FILE = "uncond.safetensors"  # the prompt "" encoded once by the cache stage (read_uncond)
FORMAT_VERSION = 2  # of the per-shard Parquet layout below; part of every shard key
ENCODER_PARTS = ("vae/", "text_encoder", "tokenizer", "model_index.json", "swd_teacher.json")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def vae_scale_factor(directory: str | Path) -> int:
    """2 ** (number of VAE blocks - 1), as StableDiffusion3Pipeline computes it."""
    config = json.loads((Path(directory) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def encoder_digest(directory: str | Path) -> str:
    """A digest of every file the encoders read: VAE, text encoders, tokenizers (not the transformer)."""
    from pipeline.teacher import directory_digest

    files = [f for f in directory_digest(Path(directory)) if f[0].startswith(ENCODER_PARTS)]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


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
    """Tensors of a decoded cache row (`decode_batch`): z_i and z_im1_i per scale index i, then the text
    embeddings. What is stored is `stored_columns`."""
    return ([f"z_{i}" for i in range(num_scales)] + [f"z_im1_{i}" for i in range(num_scales)]
            + ["prompt_embeds", "pooled_prompt_embeds"])


def implied_columns(scales) -> dict[str, str]:
    """{z_im1_i: z_i} where s[i-1] == s[i] (s[-1] := s[0], so always z_im1_0): I_im1 = area(I_i -> pixels of
    s[i-1]) is I_i itself there, so z_im1_i == z_i and is not stored."""
    scales = list(scales)
    return {f"z_im1_{i}": f"z_{i}" for i in range(len(scales)) if scales[max(i - 1, 0)] == scales[i]}


def stored_columns(scales) -> list[str]:
    """Tensor columns a cache row stores: `tensor_names` less the `implied_columns`."""
    implied = implied_columns(scales)
    return [n for n in tensor_names(len(list(scales))) if n not in implied]


@dataclass(frozen=True)
class TextLayout:
    """How `prompt_embeds` [clip_tokens + t5_tokens, width] is stored: the CLIP block at its own width
    (the CLIP-L and CLIP-G states side by side; diffusers zero-pads them to `width`), and the T5 block
    only when `t5` (no T5 encoder: diffusers' T5 block is zeros, not stored)."""
    clip_tokens: int
    clip_width: int  # stored width of the CLIP tokens (<= width)
    t5_tokens: int
    width: int  # joint width of prompt_embeds (T5's d_model, or the transformer's joint_attention_dim)
    t5: bool

    @property
    def shape(self) -> list[int]:
        """The stored `prompt_embeds_shape`: [tokens, width, clip_tokens, clip_width]."""
        return [self.clip_tokens + self.t5_tokens, self.width, self.clip_tokens, self.clip_width]

    def as_dict(self) -> dict:
        return asdict(self)


def text_layout(bundle, prompt_embeds_shape) -> TextLayout:
    """How this bundle's prompt_embeds [B, L, D] are stored: its CLIP tokens (the CLIP tokenizer's
    length) at the two CLIP widths side by side (at most D: diffusers pads or cuts them to D), then the
    T5 tokens when there is a T5 encoder."""
    _, tokens, width = (int(v) for v in prompt_embeds_shape)
    clip_tokens = int(bundle.pipeline.tokenizer_max_length)
    clip_width = int(bundle.text_encoder.config.hidden_size) + int(bundle.text_encoder_2.config.hidden_size)
    return TextLayout(clip_tokens=clip_tokens, clip_width=min(clip_width, width), t5_tokens=tokens - clip_tokens,
                      width=width, t5=bundle.text_encoder_3 is not None)


def pack_prompt_embeds(prompt_embeds, layout: TextLayout):
    """[B, L, D] -> [B, n] flat rows of the stored blocks (CLIP block, then the T5 block when `layout.t5`).
    ValueError when what is left out is not zero bit for bit (then the read-back would differ)."""
    import torch

    b, tokens, width = prompt_embeds.shape
    if [tokens, width] != layout.shape[:2]:
        raise ValueError(f"prompt_embeds of shape {list(prompt_embeds.shape[1:])} do not fit the text layout "
                         f"{layout.as_dict()}")
    lc, dc = layout.clip_tokens, layout.clip_width
    left_out = [prompt_embeds[:, :lc, dc:]] + ([] if layout.t5 else [prompt_embeds[:, lc:]])
    for part in left_out:
        if part.numel() and bool(_bits(part).ne(0).any()):
            raise ValueError(f"prompt_embeds: the part the text layout {layout.as_dict()} leaves out (the CLIP "
                             f"padding, or the T5 tokens of a teacher without T5) is not all zeros")
    blocks = [prompt_embeds[:, :lc, :dc].reshape(b, -1)]
    if layout.t5:
        blocks.append(prompt_embeds[:, lc:].reshape(b, -1))
    return torch.cat(blocks, dim=1)


def unpack_prompt_embeds(flat, shape):
    """One stored row (1-D) and its `_shape` [L, D, clip_tokens, clip_width] -> [L, D] (zero pad + concat)."""
    import torch

    tokens, width, lc, dc = (int(v) for v in shape)
    clip = lc * dc
    rest = flat.numel() - clip
    if rest not in (0, (tokens - lc) * width):
        raise ValueError(f"cache prompt_embeds: {flat.numel()} stored values do not fit the packed shape {list(shape)}")
    out = torch.zeros(tokens, width, dtype=flat.dtype)
    out[:lc, :dc] = flat[:clip].view(lc, dc)
    if rest:
        out[lc:] = flat[clip:].view(tokens - lc, width)
    return out


def row_bytes(scales, channels: int, clip_tokens: int, clip_width: int, t5_tokens: int, t5_width: int,
              pooled_width: int, storage_dtype: str, t5: bool = True, format_version: int = FORMAT_VERSION) -> dict:
    """Tensor bytes of one cache row, by part, from the layout alone: {"z", "z_im1", "prompt_embeds",
    "pooled_prompt_embeds", "total"}. `t5_width` is the joint width of prompt_embeds (T5's, or the
    transformer's joint_attention_dim without T5); `t5` false: no T5 encoder (its zeros are not stored).
    `format_version` 1: the layout before (every z_im1_i, prompt_embeds dense). The `_shape` / `_dtype`
    columns, key and prompt add about 100 bytes more."""
    scales = list(scales)
    element = DTYPE_BYTES[storage_dtype]
    z = sum(channels * s * s for s in scales)
    implied = implied_columns(scales) if format_version >= 2 else {}
    z_im1 = sum(channels * scales[max(i - 1, 0)] ** 2 for i in range(len(scales)) if f"z_im1_{i}" not in implied)
    if format_version >= 2:
        text = clip_tokens * min(clip_width, t5_width) + (t5_tokens * t5_width if t5 else 0)
    else:
        text = (clip_tokens + t5_tokens) * t5_width
    out = {"z": z * element, "z_im1": z_im1 * element, "prompt_embeds": text * element,
           "pooled_prompt_embeds": pooled_width * element}
    out["total"] = sum(out.values())
    return out


def rows_table(keys: list[str], prompts: list[str], shard_keys: list[str], tensors: dict, names: list[str],
               text_layout: TextLayout | None = None):
    """One cache row per sample: key, prompt, shard_key, and per tensor of `names`: bytes, shape, dtype.
    With `text_layout`, prompt_embeds is stored packed (`pack_prompt_embeds`)."""
    import pyarrow as pa

    columns: dict[str, pa.Array] = {"key": pa.array(keys, pa.string()), "prompt": pa.array(prompts, pa.string()),
                                    "shard_key": pa.array(shard_keys, pa.string())}
    for name in names:
        t = tensors.get(name)
        if t is None:
            data, shapes, dtypes = [], [], []
        else:
            packed = name == "prompt_embeds" and text_layout is not None
            t = t.cpu()
            data, shape, dtype = tensor_bytes(pack_prompt_embeds(t, text_layout) if packed else t)
            shapes, dtypes = [text_layout.shape if packed else shape] * len(keys), [dtype] * len(keys)
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


def read_uncond(cache_dir: str | Path):
    """(prompt_embeds [1, L, D], pooled_prompt_embeds [1, P]) of the prompt "", as the cache's encoders
    made them (`TeacherBundle.encode_prompt([""])`, in the encoders' dtype), from `uncond.safetensors`."""
    from safetensors.torch import load_file

    manifest = read_manifest(cache_dir)
    if "uncond" not in manifest:
        raise ValueError(f"cache {cache_dir}: no unconditional embedding recorded (format "
                         f"{manifest.get('format_version', 1)}, made by an older cache stage); re-run the cache stage")
    tensors = load_file(str(Path(cache_dir) / manifest["uncond"]["file"]))
    return tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]


def read_cache(cache_dir: str | Path, columns: list[str] | None = None, **read_parquet_args):
    """The cache as a `ray.data.Dataset` (`ray.data.read_parquet` over every listed shard dir that
    holds rows). `columns` prunes the read, e.g. one scale: ["key", "z_2", "z_2_shape", "z_2_dtype", ...];
    an implied column that is not stored (z_im1_0) reads its source (z_0), which `decode_batch` fills it from."""
    import ray

    manifest = read_manifest(cache_dir)
    dirs = [e["dir"] for e in manifest["shards"] if e["rows"]]
    if not dirs:
        raise ValueError(f"cache {cache_dir}: no rows (rejects by reason: {manifest['rejects_by_reason']})")
    # The column list goes to the Parquet reader itself: only those column chunks are read from storage.
    if columns:
        read_parquet_args["columns"] = stored_names(columns, manifest)
    return ray.data.read_parquet(dirs, file_extensions=["parquet"], partitioning=None, **read_parquet_args)


def stored_names(columns: list[str], manifest: dict) -> list[str]:
    """Requested column names -> the stored ones: an implied column (and its _shape / _dtype) that is not
    stored becomes its source's; the order is kept, duplicates dropped."""
    implied = {k: v for k, v in manifest.get("implied_columns", {}).items() if k not in manifest.get("columns", ())}
    out = []
    for c in columns:
        suffix = next((s for s in ("_shape", "_dtype") if c.endswith(s)), "")
        base = c[: len(c) - len(suffix)]
        name = implied[base] + suffix if base in implied else c
        if name not in out:
            out.append(name)
    return out


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


def decode_column(name: str, data: bytes, shape, dtype: str):
    """One stored cell of column `name` -> its tensor (prompt_embeds unpacked when stored packed)."""
    if name == "prompt_embeds" and len(shape) == 4:
        return unpack_prompt_embeds(decode_tensor(data, [-1], dtype), shape)
    return decode_tensor(data, shape, dtype)


def decode_row(row: dict, scales=None) -> dict:
    """A cache row (dict) -> {"key", "prompt", <tensor name>: tensor without a batch dim}; implied
    columns filled as `decode_batch` does."""
    out: dict[str, Any] = {k: row[k] for k in ("key", "prompt") if k in row}
    for name in _tensor_columns(row):
        out[name] = decode_column(name, row[name], row[f"{name}_shape"], row[f"{name}_dtype"])
    _fill_implied(out, scales)
    return out


def decode_batch(batch, scales=None) -> dict:
    """A batch of cache rows (Ray Data numpy or pandas batch, pyarrow table, or dict of lists) ->
    {"key": [...], "prompt": [...], "z": [[B, C, s_i, s_i] per scale], "z_im1": [...],
    "prompt_embeds": [B, L, D], "pooled_prompt_embeds": [B, P], and every tensor column by name}.

    Implied columns (z_im1_i == z_i, not stored) are filled with the z_i tensor itself: z_im1_0 when z_0
    and other latents are in the batch (a read of z_0 alone, as distill's scale-0 read, gets none, as
    before), z_im1_i (i > 0) when z_i and z_{i-1} are and have the same side, or, given the manifest's
    `scales`, wherever s[i-1] == s[i] and z_i is in the batch."""
    import torch

    if hasattr(batch, "to_pydict"):  # pyarrow
        batch = batch.to_pydict()
    elif hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        batch = {c: list(batch[c]) for c in batch.columns}
    out: dict[str, Any] = {k: [str(v) for v in batch[k]] for k in ("key", "prompt") if k in batch}
    for name in _tensor_columns(batch):
        columns = zip(batch[name], batch[f"{name}_shape"], batch[f"{name}_dtype"])
        tensors = [decode_column(name, d, s, t) for d, s, t in columns]
        out[name] = torch.stack(tensors) if tensors else torch.empty(0)
    _fill_implied(out, scales)
    scales_in = sorted(int(n[2:]) for n in out if re.fullmatch(r"z_\d+", n))
    if scales_in:
        out["z"] = [out[f"z_{i}"] for i in scales_in]
        if all(f"z_im1_{i}" in out for i in scales_in):
            out["z_im1"] = [out[f"z_im1_{i}"] for i in scales_in]
    return out


def _fill_implied(out: dict, scales=None) -> None:
    """z_im1_i := z_i (the same tensor) where it is implied and not in `out` (see `decode_batch`)."""
    present = sorted(int(n[2:]) for n in out if re.fullmatch(r"z_\d+", n))
    implied = implied_columns(scales) if scales is not None else None
    for i in present:
        name = f"z_im1_{i}"
        if name in out:
            continue
        if implied is not None:
            fill = name in implied
        elif i == 0:
            fill = len(present) > 1 or any(n.startswith("z_im1_") for n in out)
        else:
            prev = out.get(f"z_{i - 1}")
            fill = prev is not None and prev.shape[-2:] == out[f"z_{i}"].shape[-2:]
        if fill:
            out[name] = out[f"z_{i}"]


def _bits(x):
    """The raw bit patterns of a float tensor (so -0.0 is not zero)."""
    import torch

    return x.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _tensor_columns(batch) -> list[str]:
    return [k[: -len("_dtype")] for k in batch if k.endswith("_dtype") and k[: -len("_dtype")] in batch]
