"""bench/levers.py: two students beside one teacher on fresh prompts, paired intervals, the overrides."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers.exports import make_student_export, make_teacher_output

ROOT = Path(__file__).resolve().parents[1]


def _levers():
    spec = importlib.util.spec_from_file_location("levers", ROOT / "bench" / "levers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _distill_output(root: Path, name: str, teacher: Path, num_steps: int, seed: int) -> Path:
    bundle = json.loads((teacher / "teacher.json").read_text())["location"]
    out = make_student_export(root / name, Path(bundle), scales=[8, 10, 12, 16], seed=seed)
    (out / "manifest.json").write_text(json.dumps({
        "inputs": {"teacher": str(teacher)},
        "sections": {"distill": {"num_steps": num_steps, "lr": 1e-4}, "swd": {"loss": {"mmd_weight": 1.0}}}}))
    return out


def test_two_students_paired_against_one_cached_teacher(tmp_path, capsys):
    levers = _levers()
    teacher = make_teacher_output(tmp_path)
    a = _distill_output(tmp_path, "a", teacher, num_steps=10, seed=1)
    b = _distill_output(tmp_path, "b", teacher, num_steps=20, seed=2)
    args = [str(a), str(b), "--prompts", "6", "--batch-size", "4", "--resamples", "50",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "levers.md")]
    assert levers.main(args) == 0
    table = (tmp_path / "levers.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| distill")]
    assert [r.split(" | ")[0] for r in rows] == ["| a", "| b"]
    cells_a, cells_b = ([c.strip() for c in r.strip("|").split("|")] for r in rows)
    assert cells_a[1] == "-" and cells_b[1] == "distill.num_steps=20"
    assert cells_a[4] == "+0.000 [+0.000, +0.000]"  # the first student against itself
    for cells in (cells_a, cells_b):
        assert 0.0 <= float(cells[2]) <= 1.0
    assert len(list((tmp_path / "cache").glob("teacher-*.npy"))) == 1
    capsys.readouterr()
    # a second call reuses the teacher's results and gives the same table
    assert levers.main(args) == 0
    assert capsys.readouterr().out.split("\n", 1)[1] == table.split("\n", 1)[1]


def test_a_directory_that_is_not_a_distill_output_is_named(tmp_path):
    levers = _levers()
    with pytest.raises(SystemExit, match="no manifest.json"):
        levers.main([str(tmp_path), "--prompts", "4"])
