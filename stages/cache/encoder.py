"""Steps 3 and 4 of the cache stage, the work inside the Ray Data workers after the read: decode and
downsample on CPU (`decode_images`), then encode on the encoder actors (`TeacherEncoder`).

Decode (SWD.md section 4): image -> upright RGB -> centre crop to a square
(`pipeline.samples.square_image`) -> I_i = area(image -> pixels of s[i]),
I_im1 = area(I_i -> pixels of s[i-1]) with s[-1] := s[0] (`pipeline.swd.inputs.scale_images`).
Encode: z_i = (E(I_i) - shift) * scaling, the same for z_im1 (the posterior's mode, or one draw
seeded per key and column), and the prompt embeddings of `TeacherBundle.encode_prompt`.
"""

from __future__ import annotations

import hashlib

from pipeline import samples
from pipeline.latent_cache import from_numpy, rows_table, tensor_names, to_numpy, transport_dtype
from stages.cache.shard_keys import EncoderSpec

# ----------------------------------------------------------------------------- step 3: decode and downsample


def image_tensor(data: bytes):
    """Image bytes -> upright (EXIF orientation) RGB, centre-cropped to a square
    (`pipeline.samples.square_image`), as float32 [1, 3, S, S] in [-1, 1] (raises for bytes that
    are not an image)."""
    import numpy as np
    import torch

    image = samples.square_image(data)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).unsqueeze(0)
    return pixels.float() / 127.5 - 1.0


def pixel_columns(num_scales: int) -> list[str]:
    return [f"pixels_{i}" for i in range(num_scales)] + [f"pixels_im1_{i}" for i in range(num_scales)]


def decode_images(batch, spec: EncoderSpec, tally=None) -> dict:
    """Ray Data map_batches (CPU): image bytes -> I_i and I_im1 of every scale (SWD.md section 4).

    I_i = area(image -> pixels of s[i]); I_im1 = area(I_i -> pixels of s[i-1]), s[-1] := s[0]. Pixels
    leave in the encoder's dtype (what the VAE would cast them to anyway). Bytes that are not an
    image and images smaller than the largest scale are rejects, sent to `tally`."""
    import numpy as np
    import ray
    import torch

    from pipeline.swd.inputs import scale_images

    n_scales = len(spec.scales)
    largest = max(spec.pixel_sides)
    out: dict[str, list] = {"key": [], "shard_key": [], "prompt": [], **{c: [] for c in pixel_columns(n_scales)}}
    rejects: dict[str, list[dict]] = {}
    rows = batch.to_pylist()
    with torch.no_grad():
        for row in rows:
            try:
                image = image_tensor(row["image"])
            except Exception as e:  # PIL raises many types for bytes that are not an image
                rejects.setdefault(row["shard_key"], []).append(
                    {"url": "", "key": row["key"], "reason": "not_image",
                     "detail": f"{row['image_ext']}: {type(e).__name__}: {e}"[:300]})
                continue
            if image.shape[-1] < largest:
                rejects.setdefault(row["shard_key"], []).append(
                    {"url": "", "key": row["key"], "reason": "too_small",
                     "detail": f"{image.shape[-1]} px square after the centre crop < {largest} px (largest scale)"})
                continue
            for i in range(n_scales):
                image_i, image_im1 = scale_images(image, spec.scales, i, spec.vae_scale_factor)
                out[f"pixels_{i}"].append(to_numpy(image_i[0], spec.dtype))
                out[f"pixels_im1_{i}"].append(to_numpy(image_im1[0], spec.dtype))
            for k in ("key", "shard_key", "prompt"):
                out[k].append(row[k])
    for shard_key, entries in rejects.items():
        if tally is not None:
            ray.get(tally.reject.remote(shard_key, entries))
    dtype = transport_dtype(spec.dtype)
    result = {k: np.array(out[k], dtype=object) for k in ("key", "shard_key", "prompt")}
    for i in range(n_scales):
        prev = spec.pixel_sides[max(i - 1, 0)]
        for name, side in ((f"pixels_{i}", spec.pixel_sides[i]), (f"pixels_im1_{i}", prev)):
            result[name] = np.stack(out[name]) if out[name] else np.zeros((0, 3, side, side), dtype)
    return result


def decode_memory_bytes(spec: EncoderSpec, batch_size: int) -> int:
    """Working set of one decode call: per image, a float32 crop at twice the largest scale's pixel
    size (images are usually larger than the largest scale) and every scale's two float32 images."""
    largest = max(spec.pixel_sides)
    prev = [spec.pixel_sides[max(i - 1, 0)] for i in range(len(spec.scales))]
    per_image = 3 * 4 * ((2 * largest) ** 2 + sum(p * p for p in spec.pixel_sides) + sum(p * p for p in prev))
    return batch_size * per_image + (768 << 20)  # + the worker itself (Python, torch, PIL: ~550 MiB measured)


# ----------------------------------------------------------------------------- step 4: encoders


class TeacherEncoder:
    """Encoder actor: loads the teacher's VAE and text encoders once, encodes batches of decoded images."""

    def __init__(self, spec: EncoderSpec, tally=None):
        import torch

        from pipeline.teacher import load_bundle

        self.spec, self.tally = spec, tally
        self.bundle = load_bundle(spec.location, spec.dtype, spec.device, spec.local_files_only, spec.load_t5,
                                  spec.max_sequence_length)
        self.storage = getattr(torch, spec.storage_dtype)

    def __call__(self, batch: dict):
        """A decoded batch (numpy) -> a pyarrow table of cache rows."""
        keys = [str(k) for k in batch["key"]]
        tensors = self.forward(batch) if keys else {}
        if self.tally is not None and keys:
            self.tally.encoded.remote(len(keys))
        return rows_table(keys, [str(p) for p in batch["prompt"]], [str(s) for s in batch["shard_key"]],
                          {k: v.to(self.storage) for k, v in tensors.items()}, tensor_names(len(self.spec.scales)))

    def forward(self, batch: dict) -> dict:
        """The encoders alone: z_i and z_im1_i of every scale i, prompt_embeds, pooled_prompt_embeds."""
        import torch

        keys = [str(k) for k in batch["key"]]
        tensors = {}
        with torch.inference_mode():
            for i in range(len(self.spec.scales)):
                tensors[f"z_{i}"] = self.latents(batch[f"pixels_{i}"], keys, f"z_{i}")
                if self.spec.scales[max(i - 1, 0)] == self.spec.scales[i]:
                    tensors[f"z_im1_{i}"] = tensors[f"z_{i}"]  # I_im1 == I_i: area to the same size is the identity
                else:
                    tensors[f"z_im1_{i}"] = self.latents(batch[f"pixels_im1_{i}"], keys, f"z_im1_{i}")
            prompt_embeds, pooled = self.bundle.encode_prompt([str(p) for p in batch["prompt"]])
        tensors["prompt_embeds"], tensors["pooled_prompt_embeds"] = prompt_embeds, pooled
        return tensors

    def latents(self, pixels, keys: list[str], name: str):
        """(E(pixels) - shift_factor) * scaling_factor, as the SD3 pipelines normalise latents."""
        import torch

        x = from_numpy(pixels, self.spec.dtype)
        if self.spec.posterior == "mode":
            return self.bundle.encode_images(x)  # (latent_dist.mode() - shift) * scaling
        vae = self.bundle.vae
        generators = [torch.Generator(vae.device).manual_seed(sample_seed(self.spec.seed, key, name))
                      for key in keys]
        z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.sample(generator=generators)
        return (z - self.bundle.shift_factor) * self.bundle.scaling_factor


def sample_seed(seed: int, key: str, name: str) -> int:
    """The seed of one posterior draw (`posterior: sample`): per sample key and tensor column, so a
    sample's latent does not depend on which batch it was encoded in."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}/{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
