"""The evaluation record: what the evaluate stage writes to `metrics.json` and mirrors onto the
parent run, and what the register stage, `compare` and the MLflow UI read back."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.json"  # in the evaluate stage's output: {"metrics": {...}, "eval_set": {...}, ...}

GENERATORS = ("student", "teacher", "baseline")
CANONICAL_METRICS = (
    "student_fd", "teacher_fd", "baseline_fd",
    "student_adherence", "teacher_adherence", "baseline_adherence",
    "student_latency_s", "teacher_latency_s", "baseline_latency_s",
    "speedup_vs_teacher", "speedup_vs_baseline",
)
# Metrics of the student the register stage may promote on, and whether higher is better.
HIGHER_IS_BETTER = {"student_fd": False, "student_fid": False, "student_latency_s": False,
                    "student_adherence": True, "student_clip_score": True,
                    "speedup_vs_teacher": True, "speedup_vs_baseline": True}


def read_record(evaluate_output_dir: str | Path) -> dict:
    """The `metrics.json` of a committed evaluate stage output."""
    return json.loads((Path(evaluate_output_dir) / METRICS_FILE).read_text())
