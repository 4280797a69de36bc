"""Stage outputs made in code: a teacher stage output, a student export, an eval shards output."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline import shapes, tiny
from pipeline.student_export import SCHEDULE_FILE, STUDENT_DIR, save_student
from pipeline.swd.config import StudentConfig, SwdConfig

TINY_SIGMAS = SwdConfig().schedule.sigmas  # the tiny-4step preset: 4 steps, final sigma 0
ALL = (shapes.SHAPES, list(shapes.COLOURS_RGB), list(shapes.SIZES_CELL_FRACTION), list(shapes.BACKGROUNDS_RGB))



def make_teacher_output(root: Path) -> Path:
    """A `teacher` stage output naming a random one-layer tiny bundle (as for a pretrained teacher)."""
    bundle = tiny.save_bundle(tiny.build_pipeline(seed=0, num_layers=1), root / "bundle")
    out = root / "teacher"
    out.mkdir(parents=True)
    (out / "teacher.json").write_text(json.dumps({"source": "pretrained", "location": str(bundle)}))
    return out



def make_student_export(out: Path, bundle: Path, scales: list[int], seed: int = 1, full: bool = False) -> Path:
    """A distill-stage export: `student/` via save_student (random non-zero LoRA B) + `schedule.json`."""
    from pipeline.swd.networks import build_student
    from pipeline.teacher import load_bundle

    b = load_bundle(bundle)
    student, _ = build_student(b.transformer, StudentConfig(lora_rank=4, lora_alpha=4, full_finetune=full))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name or (full and name.endswith("proj_out.weight")):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    out.mkdir(parents=True)
    save_student(student, out / STUDENT_DIR)
    (out / SCHEDULE_FILE).write_text(json.dumps({"scales": scales, "sigmas": TINY_SIGMAS}))
    return out



def make_shards_output(root: Path, num_eval: int, prompts: list[str] | None = None) -> Path:
    """A `shards` stage output with one eval shard of generated shapes samples."""
    import webdataset as wds

    (root / "eval").mkdir(parents=True)
    with wds.TarWriter(str(root / "eval" / "eval-000000.tar")) as sink:
        for i in range(num_eval):
            s = shapes.make_sample(0, "eval", i, 64, *ALL)
            if prompts is not None:
                s = {**s, "txt": prompts[i]}
                del s["json"]
            sink.write(s)
    (root / "shards.json").write_text(json.dumps({"train": [], "eval": [{"url": "eval/eval-000000.tar"}]}))
    return root
