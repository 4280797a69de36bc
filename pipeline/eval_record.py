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
    # the published protocol's metrics (issue 17), where configured
    "student_fid", "teacher_fid", "baseline_fid",
    "student_clip_score", "teacher_clip_score", "baseline_clip_score",
    "student_pickscore", "teacher_pickscore", "baseline_pickscore",
)
# Paired bootstrap 95% intervals (pipeline/bootstrap.py) of adherence and FD: per generator, and of the
# student - teacher and baseline - student differences ("a gap is real when its interval excludes 0").
INTERVAL_PAIRS = (("student", "teacher"), ("baseline", "student"))
INTERVAL_METRICS = tuple(
    [f"{g}_{m}_ci95_{end}" for g in GENERATORS for m in ("adherence", "fd") for end in ("low", "high")]
    + [f"{a}_minus_{b}_{m}_ci95_{end}" for a, b in INTERVAL_PAIRS for m in ("adherence", "fd") for end in ("low", "high")])
# The protocol digests (`pipeline.eval_protocol.protocol_id`) of `_fd` and `_fid`: `compare` puts two runs'
# FDs / FIDs side by side only when these agree.
PROTOCOL_METRICS = ("fd_protocol_id", "fid_protocol_id")
# What the evaluate stage mirrors onto the pipeline's parent run (what `compare` and the runs table read).
PARENT_METRICS = CANONICAL_METRICS + INTERVAL_METRICS + PROTOCOL_METRICS


def interval_of(metrics: dict, name: str) -> tuple[float, float] | None:
    """(low, high) of `name`'s 95% interval in a metrics dict, or None when not there."""
    low, high = metrics.get(f"{name}_ci95_low"), metrics.get(f"{name}_ci95_high")
    return None if low is None or high is None else (low, high)
# Metrics of the student the register stage may promote on, and whether higher is better.
HIGHER_IS_BETTER = {"student_fd": False, "student_fid": False, "student_latency_s": False,
                    "student_adherence": True, "student_clip_score": True,
                    "speedup_vs_teacher": True, "speedup_vs_baseline": True}


def read_record(evaluate_output_dir: str | Path) -> dict:
    """The `metrics.json` of a committed evaluate stage output."""
    return json.loads((Path(evaluate_output_dir) / METRICS_FILE).read_text())
