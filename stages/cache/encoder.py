"""Steps 3 and 4 of the cache stage, the work inside the Ray Data workers after the read: decode on CPU
(`decode_images`), then downsample and encode on the encoder actors (`TeacherEncoder`).

Decode (SWD.md section 4): image -> upright RGB -> centre crop to a square
(`pipeline.samples.square_image`), kept as uint8 [S, S, 3] (what crosses the object store: 3 S^2
bytes a row, instead of every scale's I_i and I_im1 as float pixels).
Encoder actor: [-1, 1] pixels (`pixels_tensor`), I_i = area(image -> pixels of s[i]),
I_im1 = area(I_i -> pixels of s[i-1]) with s[-1] := s[0] (`pipeline.swd.inputs.scale_images`, on the
actor's CPU, per image, exactly as the decode tasks did before), then z_i = (E(I_i) - shift) * scaling,
the same for z_im1 where s[i-1] != s[i] (elsewhere z_im1_i == z_i is not stored:
`pipeline.latent_cache.implied_columns`), and the prompt embeddings of `TeacherBundle.encode_prompt`,
stored packed (`pipeline.latent_cache.TextLayout`). The actors load the VAE and the text encoders only.
"""

from __future__ import annotations

import functools
import hashlib

from pipeline import samples
from pipeline.latent_cache import implied_columns, rows_table, stored_columns, text_layout
from stages.cache.shard_keys import EncoderSpec

ENCODER_COMPONENTS = ("vae", "text")  # what an encoder actor loads (pipeline.teacher.load_bundle): no transformer

# ----------------------------------------------------------------------------- step 3: decode


def image_pixels(data: bytes):
    """Image bytes -> upright (EXIF orientation) RGB, centre-cropped to a square
    (`pipeline.samples.square_image`), as uint8 [S, S, 3] (raises for bytes that are not an image)."""
    import numpy as np

    return np.asarray(samples.square_image(data))


def pixels_tensor(pixels):
    """uint8 [S, S, 3] -> float32 [1, 3, S, S] in [-1, 1]: u / 127.5 - 1 of each level u, computed once
    in float32 (`_levels`) and looked up, so exactly `u.float() / 127.5 - 1.0`; a channels-last view of
    [S, S, 3] as it always was (the area resize then threads over output pixels, not over 3 planes)."""
    import numpy as np
    import torch

    return torch.from_numpy(_levels()[np.asarray(pixels, dtype=np.uint8)]).permute(2, 0, 1).unsqueeze(0)


@functools.cache
def _levels():
    import torch

    return (torch.arange(256, dtype=torch.uint8).float() / 127.5 - 1.0).numpy()


def image_tensor(data: bytes):
    """Image bytes -> float32 [1, 3, S, S] in [-1, 1]: `pixels_tensor(image_pixels(data))`."""
    return pixels_tensor(image_pixels(data))


def decode_images(batch, spec: EncoderSpec, tally=None) -> dict:
    """Ray Data map_batches (CPU): image bytes -> the upright, centre-cropped square as uint8 [S, S, 3].

    Bytes that are not an image and images smaller than the largest scale are rejects, sent to
    `tally`. Images of different sizes make a ragged `image` column (Ray Data's variable-shaped tensors)."""
    import numpy as np
    import ray

    largest = max(spec.pixel_sides)
    out: dict[str, list] = {"key": [], "shard_key": [], "prompt": [], "image": []}
    rejects: dict[str, list[dict]] = {}
    for row in batch.to_pylist():
        try:
            pixels = image_pixels(row["image"])
        except Exception as e:  # PIL raises many types for bytes that are not an image
            rejects.setdefault(row["shard_key"], []).append(
                {"url": "", "key": row["key"], "reason": "not_image",
                 "detail": f"{row['image_ext']}: {type(e).__name__}: {e}"[:300]})
            continue
        if pixels.shape[0] < largest:
            rejects.setdefault(row["shard_key"], []).append(
                {"url": "", "key": row["key"], "reason": "too_small",
                 "detail": f"{pixels.shape[0]} px square after the centre crop < {largest} px (largest scale)"})
            continue
        for k in ("key", "shard_key", "prompt"):
            out[k].append(row[k])
        out["image"].append(pixels)
    for shard_key, entries in rejects.items():
        if tally is not None:
            ray.get(tally.reject.remote(shard_key, entries))
    result = {k: np.array(out[k], dtype=object) for k in ("key", "shard_key", "prompt")}
    images = out["image"]
    if not images:
        result["image"] = np.zeros((0, largest, largest, 3), np.uint8)
    elif len({p.shape for p in images}) == 1:
        result["image"] = np.stack(images)
    else:
        result["image"] = np.empty(len(images), dtype=object)
        result["image"][:] = images
    return result


def decode_memory_bytes(spec: EncoderSpec, batch_size: int) -> int:
    """Working set of one decode call: per image, the decoded RGB image and its uint8 crop at twice
    the largest scale's pixel size (images are usually larger than the largest scale)."""
    per_image = 2 * 3 * (2 * max(spec.pixel_sides)) ** 2
    return batch_size * per_image + (768 << 20)  # + the worker itself (Python, torch, PIL: ~550 MiB measured)


def transport_bytes_per_row(spec: EncoderSpec, image_side: int | None = None, format_version: int = 2) -> int:
    """Object-store bytes of one decoded row's pixels. Format 2: the uint8 crop, 3 S^2 (S: the image's
    square side, the largest scale's pixels when not given). Format 1: every scale's I_i and I_im1 in the
    encoder dtype."""
    sides = spec.pixel_sides
    if format_version >= 2:
        side = image_side or max(sides)
        return 3 * side * side
    element = {"float32": 4, "bfloat16": 2, "float16": 2}[spec.dtype]
    return sum(3 * element * (sides[i] ** 2 + sides[max(i - 1, 0)] ** 2) for i in range(len(sides)))


# ----------------------------------------------------------------------------- step 4: encoders


class TeacherEncoder:
    """Encoder actor: loads the teacher's VAE and text encoders once (no transformer), downsamples and
    encodes batches of decoded images."""

    def __init__(self, spec: EncoderSpec, tally=None):
        import torch

        from pipeline.teacher import load_bundle

        self.spec, self.tally = spec, tally
        self.bundle = load_bundle(spec.location, spec.dtype, spec.device, spec.local_files_only, spec.load_t5,
                                  spec.max_sequence_length, components=ENCODER_COMPONENTS)
        self.storage = getattr(torch, spec.storage_dtype)
        self.implied = implied_columns(spec.scales)
        self.columns = stored_columns(spec.scales)

    def __call__(self, batch: dict):
        """A decoded batch (numpy) -> a pyarrow table of cache rows (`pipeline.latent_cache` format)."""
        keys = [str(k) for k in batch["key"]]
        tensors = self.forward(batch) if keys else {}
        if self.tally is not None and keys:
            self.tally.encoded.remote(len(keys))
        layout = text_layout(self.bundle, tensors["prompt_embeds"].shape) if keys else None
        return rows_table(keys, [str(p) for p in batch["prompt"]], [str(s) for s in batch["shard_key"]],
                          {k: v.to(self.storage) for k, v in tensors.items()}, self.columns, layout)

    def forward(self, batch: dict) -> dict:
        """The encoders alone: z_i of every scale i, z_im1_i where s[i-1] != s[i], prompt_embeds,
        pooled_prompt_embeds. On a GPU the CPU resizes of the next scale overlap the VAE on this one
        (kernels run asynchronously; pixels go up from pinned memory)."""
        import torch

        keys = [str(k) for k in batch["key"]]
        tensors = {}
        with torch.inference_mode():
            prompt_embeds, pooled = self.bundle.encode_prompt([str(p) for p in batch["prompt"]])
            for name, pixels in self.scaled_pixels(batch["image"]):
                tensors[name] = self.latents(self._to_device(pixels), keys, name)
        tensors["prompt_embeds"], tensors["pooled_prompt_embeds"] = prompt_embeds, pooled
        return tensors

    def scaled_pixels(self, images):
        """uint8 crops -> (z column, [B, 3, p, p] pixels in the encoder dtype) per stored latent, scale by
        scale: I_i for z_i, then I_im1 for z_im1_i where it is stored (`scale_images` per image on the
        CPU, each image contiguous in the encoder dtype, as the decode tasks made them before)."""
        import torch

        from pipeline.swd.inputs import scale_images

        dtype = getattr(torch, self.spec.dtype)
        full = [pixels_tensor(p) for p in images]
        for i in range(len(self.spec.scales)):
            with torch.no_grad():
                pairs = [scale_images(x, self.spec.scales, i, self.spec.vae_scale_factor) for x in full]
            yield f"z_{i}", torch.stack([image_i[0].to(dtype).contiguous() for image_i, _ in pairs])
            if f"z_im1_{i}" not in self.implied:
                yield f"z_im1_{i}", torch.stack([image_im1[0].to(dtype).contiguous() for _, image_im1 in pairs])

    def _to_device(self, pixels):
        if self.bundle.vae.device.type != "cuda":
            return pixels
        return pixels.pin_memory().to(self.bundle.vae.device, non_blocking=True)

    def latents(self, pixels, keys: list[str], name: str):
        """(E(pixels) - shift_factor) * scaling_factor, as the SD3 pipelines normalise latents."""
        import torch

        if self.spec.posterior == "mode":
            return self.bundle.encode_images(pixels)  # (latent_dist.mode() - shift) * scaling
        vae = self.bundle.vae
        generators = [torch.Generator(vae.device).manual_seed(sample_seed(self.spec.seed, key, name))
                      for key in keys]
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator=generators)
        return (z - self.bundle.shift_factor) * self.bundle.scaling_factor


def encode_uncond(spec: EncoderSpec) -> dict:
    """In a Ray task with an encoder's resources: the prompt "" through the text encoders alone
    (`TeacherBundle.encode_prompt([""])`), its text layout and the encoder dtype."""
    import torch

    from pipeline.teacher import load_bundle

    bundle = load_bundle(spec.location, spec.dtype, spec.device, spec.local_files_only, spec.load_t5,
                         spec.max_sequence_length, components=("text",))
    with torch.inference_mode():
        prompt_embeds, pooled = bundle.encode_prompt([""])
    return {"prompt_embeds": prompt_embeds.cpu().contiguous(), "pooled_prompt_embeds": pooled.cpu().contiguous(),
            "text_layout": text_layout(bundle, prompt_embeds.shape).as_dict()}


def sample_seed(seed: int, key: str, name: str) -> int:
    """The seed of one posterior draw (`posterior: sample`): per sample key and tensor column, so a
    sample's latent does not depend on which batch it was encoded in."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}/{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
