"""The student export: the one definition of what the distill stage writes and everything else
reads (evaluate and synthesize generate with it, register packages it, a scheduled run warm-starts
from it).

A distill output holds `student/` (a LoRA: `pytorch_lora_weights.safetensors` with its LoraConfig
in the header, loadable by stock diffusers; or a full fine-tune: an `SD3Transformer2DModel`
directory) and `schedule.json` (the scale-wise schedule and the diffusers recipe that samples it).
A registered MLflow model holds the same two under `artifacts/export/`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline.swd.networks import STUDENT_ADAPTER, student_lora_state_dict

STUDENT_DIR = "student"
SCHEDULE_FILE = "schedule.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# Where a warm-start directory may hold the adapter: itself, a distill output, a registered model.
INIT_STUDENT_LAYOUTS = (".", STUDENT_DIR, f"artifacts/export/{STUDENT_DIR}")


class ExportError(ValueError):
    """A student export that cannot be used: says what was found and what was expected."""


# ----------------------------------------------------------------------------- writing


def export_student(student, swd, vae_scale_factor: int, directory: str | Path) -> str:
    """`directory/student/` and `directory/schedule.json`; returns the export kind ("lora" | "full")."""
    directory = Path(directory)
    kind = save_student(student, directory / STUDENT_DIR)
    (directory / SCHEDULE_FILE).write_text(json.dumps(schedule_record(swd, vae_scale_factor, kind), indent=1) + "\n")
    return kind


def load_student_lora(student, path, key: str = "distill.init_student") -> int:
    """Warm start: set the student's LoRA (built by `build_student`) from an adapter file written by
    `save_student` (safetensors, diffusers' `transformer.` key prefix) with peft's
    `set_peft_model_state_dict`. Every tensor must match the student's by name and shape, else a
    ValueError naming `key` and both shapes. Returns the number of tensors loaded."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    prefix = "transformer."
    state = {k.removeprefix(prefix): v for k, v in load_file(str(path)).items()}
    expected = {k: tuple(v.shape) for k, v in student_lora_state_dict(student).items()}
    lines = [f"{k}: {list(v.shape)} in the adapter, {list(expected[k])} in the student"
             for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]]
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if lines or missing or extra:
        where = ([f"{len(lines)} tensors differ in shape, e.g. {'; '.join(lines[:2])}"] if lines else []) + \
                ([f"{len(missing)} student tensors are not in the adapter, e.g. {missing[0]}"] if missing else []) + \
                ([f"{len(extra)} adapter tensors are not in the student, e.g. {extra[0]}"] if extra else [])
        raise ValueError(f"{key}: the adapter {str(path)!r} does not fit the student LoRA (swd.student: lora_rank, "
                         f"target_modules): {'; '.join(where)}; set swd.student to the adapter's LoRA config or "
                         f"{key}=null")
    result = set_peft_model_state_dict(student, state, adapter_name=STUDENT_ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{key}: peft did not place {len(result.unexpected_keys)} tensors of {str(path)!r} "
                         f"in the student, e.g. {result.unexpected_keys[0]}")
    return len(state)


def save_student(student, directory) -> str:
    """Export the student for stock diffusers, safetensors only. LoRA: `pytorch_lora_weights.safetensors`
    with the adapter's LoraConfig as metadata (without it diffusers loses lora_alpha), loadable with
    `StableDiffusion3Pipeline.load_lora_weights(directory)` or `transformer.load_lora_adapter(directory,
    weight_name="pytorch_lora_weights.safetensors")`; returns "lora". Full fine-tune: the transformer
    via `save_pretrained`; returns "full"."""
    if STUDENT_ADAPTER in (getattr(student, "peft_config", None) or {}):
        from diffusers.loaders import SD3LoraLoaderMixin

        SD3LoraLoaderMixin.save_lora_weights(
            directory, transformer_lora_layers=student_lora_state_dict(student),
            transformer_lora_adapter_metadata=student.peft_config[STUDENT_ADAPTER].to_dict(),
            safe_serialization=True)
        return "lora"
    student.save_pretrained(directory, safe_serialization=True)
    return "full"


def schedule_record(swd, vae_scale_factor: int, export_kind: str) -> dict:
    """The schedule, and the stock diffusers recipe that samples with it."""
    s = swd.schedule
    return {
        "scales": s.scales, "sigmas": s.sigmas, "boundaries": s.boundaries,
        "grid": {"num_steps": swd.grid.num_steps, "shift": swd.grid.shift},
        "vae_scale_factor": vae_scale_factor, "pixel_sides": [x * vae_scale_factor for x in s.scales],
        "student": {"kind": export_kind, "dir": STUDENT_DIR,
                    "weight_name": LORA_WEIGHTS if export_kind == "lora" else None},
        "diffusers": {
            "pipeline": "StableDiffusion3Pipeline",
            "scheduler": "FlowMatchLCMScheduler", "scheduler_kwargs": {"shift": 1.0},
            "set_scale_factors": {"scale_factors": [x / s.scales[0] for x in s.scales[1:]], "upscale_mode": "bicubic"},
            "call_kwargs": {"sigmas": s.sigmas[:-1], "num_inference_steps": len(s.scales),
                            "height": s.scales[0] * vae_scale_factor, "width": s.scales[0] * vae_scale_factor,
                            "guidance_scale": 1.0},
        },
    }


# ----------------------------------------------------------------------------- reading


def read_schedule(distill_output_dir: str | Path) -> dict:
    """The scale-wise schedule the distill stage exported: {"scales": [...], "sigmas": [...]}."""
    path = Path(distill_output_dir) / SCHEDULE_FILE
    if not path.is_file():
        raise ExportError(f"{path} is missing: the distill output at {distill_output_dir} has no "
                            f"exported schedule ({SCHEDULE_FILE})")
    schedule = json.loads(path.read_text())
    scales, sigmas = schedule.get("scales"), schedule.get("sigmas")
    if not scales or not sigmas or len(sigmas) != len(scales) + 1:
        raise ExportError(f"{path}: expected scales (N latent sides) and sigmas (N + 1 values), got "
                            f"scales={scales}, sigmas={sigmas}")
    return {"scales": [int(s) for s in scales], "sigmas": [float(s) for s in sigmas]}


def load_student(distill_output_dir: str | Path, bundle, in_place: bool = True):
    """(student transformer, schedule) from a distill output, on the bundle's device and dtype.

    A LoRA export is loaded into the teacher's transformer and fused into its weights (the LoRA
    layers removed again), so the student runs at the cost of a plain transformer: in place (the
    bundle's transformer *is* the student afterwards) or, with `in_place=False`, into a copy (the
    bundle keeps the teacher). A full export is loaded as its own SD3Transformer2DModel."""
    import copy

    directory = Path(distill_output_dir) / STUDENT_DIR
    schedule = read_schedule(distill_output_dir)
    if (directory / LORA_WEIGHTS).is_file():
        transformer = bundle.transformer if in_place else copy.deepcopy(bundle.transformer)
        transformer.load_lora_adapter(str(directory), weight_name=LORA_WEIGHTS, adapter_name="student",
                                      prefix="transformer")
        transformer.fuse_lora(lora_scale=1.0)
        transformer.unload_lora()  # keeps the fused weights, drops the LoRA layers
    elif (directory / "config.json").is_file():
        from diffusers import SD3Transformer2DModel

        transformer = SD3Transformer2DModel.from_pretrained(directory, torch_dtype=bundle.dtype, use_safetensors=True,
                                                            local_files_only=True).to(bundle.device)
    else:
        raise ExportError(f"{directory} holds neither a LoRA export ({LORA_WEIGHTS}) nor a full "
                            f"transformer (config.json); expected the distill stage's student export")
    transformer.eval().requires_grad_(False)
    return transformer, schedule


# ----------------------------------------------------------------------------- warm start


def init_student_adapter(init_student: str) -> Path:
    """The LoRA adapter file of `distill.init_student`: the first of D/, D/student/ (a distill stage output)
    and D/artifacts/export/student/ (an MLflow model logged by the register stage) holding LORA_WEIGHTS.
    ValueError naming the key otherwise."""
    directory = Path(os.path.expanduser(init_student))
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise ValueError(f"distill.init_student: {init_student!r} {what}; give a directory holding a student "
                         f"exported by this pipeline (a distill output, its {STUDENT_DIR}/, or a registered model "
                         f"downloaded from MLflow) or null to start from the teacher")
    for sub in INIT_STUDENT_LAYOUTS:
        if (directory / sub / LORA_WEIGHTS).is_file():
            return (directory / sub / LORA_WEIGHTS).resolve()
    looked = ", ".join(str(Path(init_student) / sub / LORA_WEIGHTS) for sub in INIT_STUDENT_LAYOUTS)
    raise ValueError(f"distill.init_student: {init_student!r} holds no student LoRA adapter (looked for {looked}); "
                     f"give a LoRA student exported by this pipeline (a full fine-tune export cannot warm start "
                     f"a LoRA student) or null to start from the teacher")


def adapter_lora_config(path: Path) -> dict | None:
    """The adapter's LoraConfig (r, lora_alpha, target_modules, ...) from the safetensors header that
    `save_student` writes; None when the file carries none. Reads the header only."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    prefix = "transformer."
    return {k.removeprefix(prefix): v for k, v in json.loads(raw).items()}


def init_student_problems(init_student: str | None, student) -> list[str]:
    """Before any Ray work: the warm-start source exists, holds a LoRA adapter, and (per its LoraConfig)
    has the rank, alpha and target modules of `swd.student`. One line per problem."""
    if init_student is None:
        return []
    if student.full_finetune:
        return [f"distill.init_student: {init_student!r} warm-starts a LoRA student, but swd.student.full_finetune="
                f"true trains every weight; set distill.init_student=null or swd.student.full_finetune=false"]
    try:
        path = init_student_adapter(init_student)
    except ValueError as e:
        return [str(e)]
    try:
        lora = adapter_lora_config(path)
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError, a bad JSON header
        return [f"distill.init_student: {init_student!r}: {str(path)!r} is not a readable safetensors adapter "
                f"({e}); give a LoRA student exported by this pipeline or null"]
    if lora is None:
        return []  # no LoraConfig in the file: the workers compare tensor shapes when they load it
    theirs = {"lora_rank": lora.get("r"), "lora_alpha": lora.get("lora_alpha"),
              "target_modules": sorted(lora.get("target_modules") or [])}
    ours = {"lora_rank": student.lora_rank, "lora_alpha": float(student.lora_alpha),
            "target_modules": sorted(student.target_modules)}
    if isinstance(theirs["lora_alpha"], (int, float)):
        theirs["lora_alpha"] = float(theirs["lora_alpha"])
    differ = [k for k in ours if theirs[k] != ours[k]]
    if not differ:
        return []
    return [f"distill.init_student: the adapter {str(path)!r} has " + ", ".join(f"{k} {theirs[k]}" for k in differ)
            + "; swd.student has " + ", ".join(f"{k} {ours[k]}" for k in differ)
            + "; set " + " ".join(f"swd.student.{k}={theirs[k]}".replace(" ", "") for k in differ)
            + " to continue from it, or distill.init_student=null to start from the teacher"]


def model_dir(local: Path) -> Path:
    """The MLflow model directory (the one holding `MLmodel`) in a download: the download itself, or
    the artifact directory it holds (`download_artifacts` keeps the artifact's name, e.g. `student/`)."""
    if (local / "MLmodel").is_file():
        return local
    found = sorted(local.glob("*/MLmodel"))
    return found[0].parent if len(found) == 1 else local


def adapter_digest(init_student: str) -> list:
    """[adapter path, sha256 of its bytes] of a warm-start source ([source, "missing"] when it holds
    none): the distill fingerprint's external part, so a new champion re-runs distill."""
    try:
        path = init_student_adapter(init_student)
    except ValueError:
        return [init_student, "missing"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return [str(path), digest.hexdigest()]
