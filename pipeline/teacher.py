"""The teacher bundle: an SD3-family diffusers pipeline's components, loaded once.

- `resolve_pretrained(spec)`: a local directory or a hub id (from the local Hugging Face cache
  unless `local_files_only` is false) -> a local directory, checked by `check_sd3_directory`.
- `load_bundle(location, dtype, device, ...)`: SD3Transformer2DModel, AutoencoderKL (with its
  `scaling_factor` / `shift_factor`), the CLIP text encoders and tokenizers, the T5 encoder where
  there is one and it is wanted, FlowMatchEulerDiscreteScheduler. Safetensors only
  (`use_safetensors=True`, no pickle), never `trust_remote_code`. `components` loads only some of
  the models (the cache encoders: `("vae", "text")`, no transformer); the others are None.
- `text_settings(directory, load_t5, max_sequence_length)`: from the files alone, whether T5 is loaded
  and how many T5 tokens a prompt embedding has (null: the T5 tokenizer's limit); errors name the key.
- `TeacherBundle.encode_prompt(prompts)`: exactly `StableDiffusion3Pipeline.encode_prompt` (it
  calls it), so `prompt_embeds` / `pooled_prompt_embeds` match diffusers'.
- `bundle_location(teacher_stage_output_dir)`: where the `teacher` stage put (or found) the teacher.

The same loader reads the embedded tiny bundle (`pipeline/tiny.py`, `assets/tiny-teacher`) and a
real SD3.5 directory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import Field

from pipeline.config import Section

REPO_ROOT = Path(__file__).resolve().parent.parent
TEACHER_FILE = "teacher.json"  # written by stages/teacher.py
BUNDLE_INFO_FILE = "swd_teacher.json"  # optional extra facts inside a bundle (pipeline/tiny.py)
DEFAULT_MAX_SEQUENCE_LENGTH = 256  # T5 tokens of SD3/SD3.5 (diffusers' default)
SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
# component -> accepted classes; the T5 slot (text_encoder_3) may be empty.
SD3_COMPONENTS: dict[str, tuple[str, ...]] = {
    "transformer": ("SD3Transformer2DModel",),
    "vae": ("AutoencoderKL",),
    "scheduler": ("FlowMatchEulerDiscreteScheduler",),
    "text_encoder": ("CLIPTextModelWithProjection",),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
DTYPES = ("float32", "bfloat16", "float16")
# load_bundle(components=...): which models to load; "text" is text_encoder, text_encoder_2 and text_encoder_3.
COMPONENTS = ("transformer", "vae", "text")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class TeacherSampler(Section):
    """The teacher's own sampler, one block wherever a stage samples the teacher (`teacher.sampler`
    for its sample grid, `synthesize.teacher_sampler`, `evaluate.teacher_sampler`): Euler steps on its
    shifted sigma grid (the scheduler's `shift`) with classifier-free guidance."""

    num_steps: int = Field(28, ge=1)  # Euler steps
    guidance_scale: float = Field(3.0, ge=1.0)  # classifier-free guidance; 1 = none (half the forwards)


class TeacherError(ValueError):
    """A teacher that cannot be used: says what was given and what was expected."""


@dataclass
class TeacherBundle:
    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any
    tokenizer_2: Any
    text_encoder_3: Any  # None when the T5 slot is empty or not loaded
    tokenizer_3: Any
    scheduler: Any
    pipeline: Any  # the StableDiffusion3Pipeline holding the components above
    location: str
    max_sequence_length: int  # T5 tokens (zeros when there is no T5) appended to the CLIP tokens
    info: dict

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.vae.config.shift_factor or 0.0)

    @property
    def device(self):
        return self._first_model().device

    @property
    def dtype(self):
        return self._first_model().dtype

    def _first_model(self):
        """The transformer, or the first loaded model of a bundle loaded without it (`load_bundle(components=)`)."""
        return next(m for m in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2) if m is not None)

    def encode_prompt(self, prompts: str | list[str], max_sequence_length: int | None = None):
        """(prompt_embeds [B, L, D], pooled_prompt_embeds [B, P]) as StableDiffusion3Pipeline makes them."""
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length if max_sequence_length is None else max_sequence_length,
        )
        return prompt_embeds, pooled

    def encode_images(self, pixels):
        """Pixels in [-1, 1] [B, 3, H, W] -> normalised latents (z - shift) * scale (posterior mode)."""
        z = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def decode_latents(self, latents):
        """Normalised latents -> pixels in [-1, 1] (SWD.md section 3, last line)."""
        z = latents.to(self.vae.device, self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample


def bundle_location(teacher_stage_output_dir: str | Path) -> str:
    """Where the teacher of a committed `teacher` stage output lives (a local directory or hub id)."""
    out = Path(teacher_stage_output_dir)
    record = json.loads((out / TEACHER_FILE).read_text())
    location = record["location"]
    return str(out / location) if record["source"] == "trained" else location


def check_dtype_device(dtype: str, device: str):
    """(torch dtype, torch device) or TeacherError for a combination this process cannot run."""
    import torch

    if dtype not in DTYPES:
        raise TeacherError(f"teacher dtype {dtype!r} is not supported; valid: {', '.join(DTYPES)}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise TeacherError(f"teacher device {device!r} is not supported; valid: cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TeacherError(f"teacher device {device!r}: no CUDA GPU is visible to this process "
                               f"(torch.cuda.is_available() is False); use device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise TeacherError(f"teacher device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dtype == "float16":
        raise TeacherError("teacher dtype 'float16' on device 'cpu' is not supported (CPU half-precision "
                           "convolution and attention kernels are missing or very slow); use float32 or bfloat16 "
                           "on cpu, or float16 on cuda")
    return getattr(torch, dtype), torch.device(device)


def resolve_pretrained(spec: str, local_files_only: bool = True) -> Path:
    """`teacher.pretrained` -> a checked local SD3 diffusers directory.

    A path (absolute, or relative to the current directory, else to the repository root) must be
    a directory; otherwise a hub id `owner/name` is looked up in the local Hugging Face cache
    (downloaded only when `local_files_only` is false; weights as safetensors only).
    """
    path = Path(os.path.expanduser(spec))
    candidates = [path] if path.is_absolute() else list(dict.fromkeys([Path.cwd() / path, REPO_ROOT / path]))
    for candidate in candidates:
        if candidate.exists():
            if not candidate.is_dir():
                raise TeacherError(f"teacher.pretrained {spec!r}: {candidate} is a file; expected a diffusers "
                                   f"directory of an SD3-family pipeline (with model_index.json)")
            check_sd3_directory(candidate, spec)
            return candidate.resolve()
    looked = " and ".join(str(c) for c in candidates)
    if not _HUB_ID.match(spec) or path.is_absolute() or spec.startswith("."):
        raise TeacherError(f"teacher.pretrained {spec!r}: no such directory (looked at {looked}); expected a "
                           f"diffusers directory of an SD3-family pipeline or a hub id like "
                           f"stabilityai/stable-diffusion-3.5-medium")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(spec, local_files_only=local_files_only,
                                  allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*/*"])
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, connection errors
        where = "in the local Hugging Face cache (teacher.local_files_only is true)" if local_files_only else "on the hub"
        raise TeacherError(f"teacher.pretrained {spec!r}: no such directory (looked at {looked}) and not found "
                           f"{where}: {type(e).__name__}: {e}") from None
    check_sd3_directory(Path(local), spec)
    return Path(local)


def check_sd3_directory(directory: Path, spec: str | None = None) -> dict:
    """model_index.json of an SD3-family pipeline with the expected components, or TeacherError."""
    name = spec or str(directory)
    index_file = directory / "model_index.json"
    if not index_file.is_file():
        raise TeacherError(f"teacher.pretrained {name!r}: {directory} has no model_index.json; expected a diffusers "
                           f"directory of an SD3-family pipeline ({', '.join(SD3_PIPELINES)})")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise TeacherError(f"teacher.pretrained {name!r}: {index_file} is not valid JSON ({e})") from None
    problems = []
    if index.get("_class_name") not in SD3_PIPELINES:
        problems.append(f"pipeline class {index.get('_class_name')!r} (expected one of {', '.join(SD3_PIPELINES)})")
    for component, classes in SD3_COMPONENTS.items():
        entry = index.get(component)
        found = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if found not in classes:
            problems.append(f"{component} is {found!r} (expected {' or '.join(classes)})")
        elif not (directory / component).is_dir():
            problems.append(f"{component}/ is missing")
    if problems:
        raise TeacherError(f"teacher.pretrained {name!r}: {directory} is not an SD3-family diffusers directory: "
                           + "; ".join(problems))
    return index


def text_settings(directory: str | Path, load_t5: bool | str = "auto", max_sequence_length: int | None = None) -> dict:
    """What the prompt embeddings of this teacher are made of, from its files alone (no model load):
    {"t5": the T5 encoder is loaded, "max_sequence_length": T5 tokens per prompt}. `load_t5` true
    requires a T5 encoder; `max_sequence_length` null is the T5 tokenizer's model_max_length (the
    released recipe), for a teacher without T5 its `swd_teacher.json` value, else 256. TeacherError
    naming the `teacher.` key otherwise."""
    directory = Path(directory)
    has_t5 = (directory / "text_encoder_3").is_dir() and (directory / "tokenizer_3").is_dir()
    if load_t5 is True and not has_t5:
        raise TeacherError(f"teacher.load_t5: true asks for SD3's T5 encoder, but {directory} has no "
                           f"text_encoder_3/ and tokenizer_3/; give a teacher with T5, or set teacher.load_t5=auto "
                           f"(T5 when present) or false (zero T5 embeddings)")
    limit = None
    if has_t5:
        config_file = directory / "tokenizer_3" / "tokenizer_config.json"
        limit = json.loads(config_file.read_text()).get("model_max_length") if config_file.is_file() else None
        limit = int(limit) if isinstance(limit, (int, float)) and limit < 1e9 else None
    if max_sequence_length is None:
        info_file = directory / BUNDLE_INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        max_sequence_length = limit if has_t5 and limit is not None else \
            int(info.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
    elif has_t5 and limit is not None and max_sequence_length > limit:
        raise TeacherError(f"teacher.max_sequence_length: {max_sequence_length} is over the T5 tokenizer's limit of "
                           f"{limit} tokens ({directory / 'tokenizer_3'}); valid: 0..{limit}, or null for {limit}")
    return {"t5": bool(has_t5 and load_t5 is not False), "max_sequence_length": int(max_sequence_length)}


def load_bundle(location: str | Path, dtype: str = "float32", device: str = "cpu", local_files_only: bool = True,
                load_t5: bool | str = "auto", max_sequence_length: int | None = None,
                components: tuple[str, ...] = COMPONENTS) -> TeacherBundle:
    """Load an SD3-family teacher (local directory or hub id) in `dtype` on `device`, eval mode, frozen.
    `load_t5` and `max_sequence_length` as in `text_settings`. `components` (of COMPONENTS): the models
    to load, the others stay None (diffusers' `from_pretrained(..., transformer=None)`); without the
    transformer, `encode_prompt` still works (a teacher without T5 reads only its config)."""
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise TeacherError(f"load_bundle components {list(components)!r}: valid are one or more of {list(COMPONENTS)}")
    torch_dtype, torch_device = check_dtype_device(dtype, device)
    directory = resolve_pretrained(str(location), local_files_only)
    index = check_sd3_directory(directory, str(location))
    text = text_settings(directory, load_t5, max_sequence_length)
    from diffusers import StableDiffusion3Pipeline

    # Empty slots (the tiny bundle's T5, the optional IP-adapter parts) must be passed as None.
    empty = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None]
    extra = {k: None for k in empty}
    if not text["t5"]:
        extra.update(text_encoder_3=None, tokenizer_3=None)
    if "transformer" not in components:
        extra["transformer"] = None
    if "vae" not in components:
        extra["vae"] = None
    if "text" not in components:
        extra.update(text_encoder=None, text_encoder_2=None, text_encoder_3=None)
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(directory, dtype=torch_dtype, use_safetensors=True,
                                                        local_files_only=True, **extra)
    except (OSError, EnvironmentError, ValueError) as e:
        raise TeacherError(f"teacher {str(location)!r}: could not load the SD3 pipeline from {directory} "
                           f"(safetensors weights only): {e}") from None
    pipe.to(torch_device)
    pipe.set_progress_bar_config(disable=True)
    if "transformer" not in components:
        # encode_prompt without T5 makes its zero T5 block [B, max_sequence_length, transformer.config.
        # joint_attention_dim]: give the pipeline the transformer's config alone (no weights).
        from diffusers import SD3Transformer2DModel
        from diffusers.configuration_utils import FrozenDict

        pipe.transformer = SimpleNamespace(config=FrozenDict(SD3Transformer2DModel.load_config(directory / "transformer")))
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None and hasattr(module, "eval"):
            module.eval().requires_grad_(False)
    info_file = directory / BUNDLE_INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return TeacherBundle(
        transformer=pipe.transformer if "transformer" in components else None, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, text_encoder_3=pipe.text_encoder_3,
        tokenizer_3=pipe.tokenizer_3, scheduler=pipe.scheduler, pipeline=pipe, location=str(directory),
        max_sequence_length=text["max_sequence_length"], info=info,
    )


def directory_digest(directory: Path) -> list[list]:
    """[relative path, size, mtime_ns] of every file under a local teacher directory (fingerprints)."""
    return [[str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(directory.rglob("*")) if p.is_file()]
