"""Generating images from a teacher bundle or an exported student: what the evaluate and synthesize
stages run in their actors, and what the registered MLflow model serves.

`Generator(GeneratorSpec)` loads a model once; `generator(prompts, seed)` -> uint8 images
[B, H, W, 3]. A spec with `student_dir` (a distill output, pipeline/student_export.py) samples the
scale-wise student without guidance; without it, the teacher's Euler sampler with CFG.
`student_pyfunc()` wraps a Generator as an MLflow pyfunc model (the register stage logs it with
`MODEL_CODE` as its models-from-code entry and ships only `pipeline/`).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from pipeline.student_export import load_student

MODEL_CODE = '''"""MLflow models-from-code entry of the SwD student (written by the register stage)."""
import mlflow

from pipeline.generate import student_pyfunc

mlflow.models.set_model(student_pyfunc())
'''


@dataclass
class GeneratorSpec:
    """What a generation actor or latency task loads; picklable for Ray."""
    name: str
    location: str
    dtype: str
    device: str
    load_t5: bool | str
    local_files_only: bool
    max_sequence_length: int | None = None  # teacher.max_sequence_length (null: the teacher's own)
    num_threads: int | None = 1  # torch threads on the CPU (None: leave torch's setting)
    student_dir: str | None = None  # a distill output: scale-wise student; None: the teacher
    teacher_num_steps: int = 28
    guidance_scale: float = 1.0
    latent_side: int | None = None  # the teacher's output latent side
    # A student's sampler ablations (pipeline.swd.sampler.sample_scalewise; the defaults are SwD):
    upsample: str = "bicubic"  # bicubic | nearest: how the latent moves to the next scale
    upsample_source: str = "clean"  # clean | noisy: upsample the clean estimate or the re-noised latent


class Generator:
    """A model loaded once: prompts and a seed -> uint8 images [B, H, W, 3]. Generators given the same
    `bundle` share its text encoders and VAE (each student gets its own transformer)."""

    def __init__(self, spec: GeneratorSpec, bundle=None):
        import torch

        from pipeline.swd.schedules import teacher_sigmas
        from pipeline.teacher import load_bundle

        if spec.device == "cpu" and spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.bundle = bundle or load_bundle(spec.location, spec.dtype, spec.device, spec.local_files_only, spec.load_t5,
                                              spec.max_sequence_length)
        # channels-last convolutions: the VAE decode is ~1.3x faster on the CPU (measured), and it is a
        # fixed cost of every generator
        self.bundle.vae.to(memory_format=torch.channels_last)
        if spec.student_dir:
            self.transformer, schedule = load_student(spec.student_dir, self.bundle, in_place=bundle is None)
            self.scales, self.sigmas, self.guidance_scale = schedule["scales"], schedule["sigmas"], 1.0
        else:
            self.transformer = self.bundle.transformer
            shift = float(self.bundle.scheduler.config.get("shift", 1.0))
            self.sigmas = teacher_sigmas(spec.teacher_num_steps, shift)
            self.scales = [spec.latent_side or int(self.transformer.config.sample_size)]
            self.guidance_scale = spec.guidance_scale
            self.uncond = self.encode([""])
        self.num_forwards = (len(self.sigmas) - 1) * (1 if self.guidance_scale == 1.0 or spec.student_dir else 2)

    def encode(self, prompts: list[str]):
        import torch

        from pipeline.swd.sampler import TextCond

        with torch.inference_mode():
            return TextCond(*self.bundle.encode_prompt(list(prompts)))

    def sample(self, cond, seed: int, return_steps: bool = False, noise=None):
        """Latents [B, C, s, s] (and per-step clean estimates) for encoded prompts; the starting
        `noise` when given (one tensor per sample), else drawn from `seed`."""
        import torch

        from pipeline.swd.sampler import sample_scalewise, sample_teacher

        generator = torch.Generator(self.bundle.device).manual_seed(seed)
        with torch.inference_mode():
            if self.spec.student_dir:
                return sample_scalewise(self.transformer, cond, self.scales, self.sigmas, generator=generator,
                                        return_steps=return_steps, noise=noise, upsample=self.spec.upsample,
                                        upsample_source=self.spec.upsample_source)
            return sample_teacher(self.transformer, cond, self.uncond, self.sigmas, self.scales[-1],
                                  guidance_scale=self.guidance_scale, generator=generator, noise=noise)

    def decode(self, latents):
        """Normalised latents -> uint8 [B, H, W, 3]."""
        import torch

        with torch.inference_mode():
            pixels = self.bundle.decode_latents(latents.contiguous(memory_format=torch.channels_last))
            return ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def __call__(self, prompts: list[str], seed: int):
        return self.decode(self.sample(self.encode(prompts), seed))

    def progression(self, prompts: list[str], seed: int, side: int):
        """uint8 [len(prompts), steps, side, side, 3]: each step's clean estimate, decoded and shown at `side`."""
        import numpy as np
        from PIL import Image

        _, steps = self.sample(self.encode(prompts), seed, return_steps=True)
        frames = []
        for x0 in steps:
            decoded = self.decode(x0)
            frames.append(np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.NEAREST))
                                    for im in decoded]))
        return np.stack(frames, axis=1)

    def sync(self) -> None:
        import torch

        if self.bundle.device.type == "cuda":
            torch.cuda.synchronize(self.bundle.device)


def encode_png(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def student_pyfunc():
    """The pyfunc model instance; its class is built here so that importing this module needs no MLflow."""
    import mlflow.pyfunc

    with warnings.catch_warnings():  # predict takes DataFrames, lists or strings: no type-hint validation
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")

        class StudentModel(mlflow.pyfunc.PythonModel):
            """pyfunc: prompts -> uint8 images [B, H, W, 3] from the SwD student (scale-wise sampler, no guidance)."""

            def load_context(self, context) -> None:
                config = context.model_config or {}
                location = context.artifacts.get("teacher") or config["teacher_location"]
                spec = GeneratorSpec(name="student", location=location, dtype=config.get("dtype", "float32"),
                                     device=config.get("device", "cpu"), load_t5=config.get("load_t5", "auto"),
                                     max_sequence_length=config.get("max_sequence_length"),
                                     local_files_only=config.get("local_files_only", True), num_threads=None,
                                     student_dir=context.artifacts["export"])
                self.generator = Generator(spec)

            def predict(self, context, model_input, params=None):
                import numpy as np
                import pandas as pd

                if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input.columns:
                    raise ValueError(f"expected a DataFrame with a 'prompt' column (the model's signature), got "
                                     f"{type(model_input).__name__}")
                prompts = [str(p) for p in model_input["prompt"]]
                if not prompts:
                    return np.zeros((0, 0, 0, 3), np.uint8)
                return self.generator(prompts, int((params or {}).get("seed", 0)))

    return StudentModel()
