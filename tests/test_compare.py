"""`pipeline/run.py compare`: recent pipeline runs' canonical metrics (mirrored onto the parent run
by run_stages, for a fresh and a cached evaluate alike) and their config differences."""

from __future__ import annotations

import types

import pytest

from pipeline import compare, graph
from stages import load_config
from pipeline.run import main, run_stages
from pipeline.eval_record import CANONICAL_METRICS


def toy_evaluate() -> types.ModuleType:
    """A stage shaped like evaluate: reads `data`, puts canonical metrics in summary["parent_metrics"]."""
    mod = types.ModuleType("toy_evaluate")
    mod.VERSION, mod.SECTIONS, mod.OUTPUTS = "1", ("data",), ("metrics.txt",)

    def run(ctx):
        seed = ctx.config.generator.seed
        (ctx.output_dir / "metrics.txt").write_text(str(seed))
        ctx.summary["parent_metrics"] = {"student_fd": 10.0 + seed, "speedup_vs_teacher": 20.0 - seed}

    mod.run = run
    return mod


@pytest.fixture
def three_runs(workdir, monkeypatch):
    """Run 1 (seed 1), run 2 (seed 2, evaluate re-runs), run 3 (seed 2 again: evaluate cached)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stages = [graph.StageSpec("evaluate", toy_evaluate())]
    for seed in (1, 2, 2):
        cfg = load_config(overrides=[f"workdir={workdir}", f"data.generator.seed={seed}"])
        planned = graph.plan(cfg, stages)
        assert run_stages(cfg, planned, f"sqlite:///{workdir / 'mlflow.db'}", []) == 0
    return workdir


def test_compare_prints_metrics_and_config_differences(three_runs, capsys):
    assert main(["compare", "--last", "3", f"workdir={three_runs}"]) == 0
    out = capsys.readouterr().out
    metrics_part, config_part = out.split("## config differences")
    assert "3 most recent pipeline run(s) of experiment 'swd-embedded'" in out
    header = next(line for line in metrics_part.splitlines() if line.startswith("| run"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["run", "started", "status", "student_fd",
                                                                 "speedup_vs_teacher"]
    rows = [line for line in metrics_part.splitlines() if "FINISHED" in line]
    assert len(rows) == 3
    assert "| 12 " in rows[0] and "| 18 " in rows[0]  # newest first; cached evaluate: metrics mirrored too
    assert "| 12 " in rows[1] and "| 11 " in rows[2] and "| 19 " in rows[2]
    seed_row = next(line for line in config_part.splitlines() if line.startswith("| data.generator.seed"))
    assert [c.strip() for c in seed_row.strip("|").split("|")][1:] == ["2", "2", "1"]
    assert "workdir" not in config_part  # the same in all three


def test_compare_last_one_and_no_runs(three_runs, tmp_path, capsys):
    assert main(["compare", "--last", "1", f"workdir={three_runs}"]) == 0
    out = capsys.readouterr().out
    assert "1 most recent pipeline run(s)" in out and "(one run: nothing to compare)" in out
    assert main(["compare", f"workdir={tmp_path / 'empty'}"]) == compare.EXIT_NO_RUNS
    assert "experiment 'swd-embedded' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--last", "0"])
    assert "--last 0: must be >= 1" in capsys.readouterr().err


def test_config_differences_and_table():
    diff = compare.config_differences([{"a": 1, "b": "x"}, {"a": 1, "b": "y", "c": 3}])
    assert diff == {"b": ["x", "y"], "c": ["-", "3"]}
    table = compare.format_table(["key", "r1"], [["b", "x"]])
    assert table.splitlines() == ["| key | r1 |", "|-----|----|", "| b   | x  |"]
    assert set(compare.canonical_metrics()) == set(CANONICAL_METRICS)
