"""bench/ablations.py: the agreement judgement from intervals (pure), the table's structure on made-up
records (pure), and the bench end to end on a tiny budget through the real stage graph (integration:
`ray_local` marks it slow), with its MLflow parent run and one child run per variant."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from conftest import REPO_ROOT, SMALL_DATA

_spec = importlib.util.spec_from_file_location("bench_ablations", REPO_ROOT / "bench" / "ablations.py")
ablations = importlib.util.module_from_spec(_spec)
sys.modules["bench_ablations"] = ablations
_spec.loader.exec_module(ablations)

ALLOWED = {"agrees", "disagrees", "within noise", "n/a"}


# ----------------------------------------------------------------------------- judgement


@pytest.mark.parametrize("variant_ci, reference_ci, diff_ci, expected", [
    ((20, 30), (10, 15), None, "higher"),          # intervals apart
    ((5, 8), (10, 15), None, "lower"),
    ((12, 30), (10, 15), None, "within noise"),    # overlap
    ((20, 30), (10, 15), (-1, 3), "within noise"),  # the paired interval wins: it holds 0
    ((12, 30), (10, 15), (0.5, 3), "higher"),      # paired: real although the intervals overlap
    ((12, 30), (10, 15), (-3, -0.5), "lower"),
    (None, (10, 15), None, None),                  # no interval: no judgement
    ((12, 30), None, None, None),
])
def test_direction_from_intervals(variant_ci, reference_ci, diff_ci, expected):
    assert ablations.direction(variant_ci, reference_ci, diff_ci) == expected


def test_agreement_and_judge():
    assert ablations.agreement("higher", "higher") == "agrees"
    assert ablations.agreement("higher", "lower") == "disagrees"
    assert ablations.agreement("higher", "within noise") == "within noise"
    assert ablations.agreement("higher", None) == "n/a"
    assert ablations.agreement("same", "within noise") == "agrees"
    assert ablations.agreement("same", "lower") == "disagrees"
    judge = ablations.judge
    assert judge("fd_higher", {"fd": "higher", "adherence": "higher"}) == "agrees"  # judged on FD only
    assert judge("fd_higher", {"fd": None}) == "n/a"
    same = {"fd": "within noise", "adherence": "within noise", "latency": "higher"}
    assert judge("same_quality_slower", same) == "agrees"
    assert judge("same_quality_slower", {**same, "latency": "within noise"}) == "within noise"
    assert judge("same_quality_slower", {**same, "fd": "lower"}) == "disagrees"
    assert judge("same_quality_slower", {**same, "adherence": None}) == "n/a"
    assert judge("cheaper_training", {"distill_s_per_step": "lower"}) == "agrees"
    assert judge("reference", {}) == "reference"
    with pytest.raises(ValueError, match=r"expected: 'x' is not a claim; valid: reference, fd_higher"):
        judge("x", {})


def test_ratio_direction_tolerance():
    assert ablations.ratio_direction(1.1) == "within noise"
    assert ablations.ratio_direction(2.2) == "higher"
    assert ablations.ratio_direction(0.3) == "lower"
    assert ablations.ratio_direction(None) is None


def test_paired_interval_either_order():
    m = {"student_minus_baseline_fd_ci95_low": -4.0, "student_minus_baseline_fd_ci95_high": 1.0}
    assert ablations.paired_interval(m, "baseline", "student", "fd") == (-1.0, 4.0)
    assert ablations.paired_interval(m, "baseline", "student", "adherence") is None


def test_variant_names_always_include_swd_full_and_reject_unknown():
    assert ablations._variant_names("nearest,no_mmd") == ["swd_full", "nearest", "no_mmd"]
    assert ablations._variant_names(None) == list(ablations.RUN_ORDER)
    assert sorted(ablations.RUN_ORDER) == sorted(ablations.BY_NAME)
    assert re.search(r"--variants: unknown bogus; valid: swd_full", ablations._variant_names("bogus"))


# ----------------------------------------------------------------------------- the table


def _metrics(gen: str, fd: float, adherence: float, ci: bool = True, **extra) -> dict:
    m = {f"{gen}_fd": fd, f"{gen}_adherence": adherence, f"{gen}_latency_s": 0.01, **extra}
    if ci:
        m.update({f"{gen}_fd_ci95_low": fd - 2, f"{gen}_fd_ci95_high": fd + 2,
                  f"{gen}_adherence_ci95_low": adherence - 0.05, f"{gen}_adherence_ci95_high": adherence + 0.05})
    return m


def _table(ci: bool) -> str:
    results = []
    for name in ablations.RUN_ORDER:
        v = ablations.BY_NAME[name]
        fd = {"swd_full": 100.0, "no_mmd": 120.0, "noisy_upsampling": 300.0, "mmd_pooled": 90.0}.get(name, 101.0)
        m = _metrics(v.generator, fd, 0.6, ci)
        if v.generator == "baseline":
            m.update({**_metrics("student", 100.0, 0.6, ci), "speedup_vs_baseline": 2.0})
        steps = {"mmd_only": 10.0}.get(name, 50.0)
        results.append(ablations.Result(v, metrics=m, distill_summary={"train_s": steps, "steps": 100}))
    failed = ablations.RUN_ORDER.index("mmd_no_noise")
    results[failed] = ablations.Result(results[failed].variant, status="failed (exit 1; see the run's stage log)")
    return ablations.table_markdown(results, {"budget": "made up"})


def _rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]


def test_table_rows_columns_paper_figures_and_verdicts():
    header, *rows = _rows(_table(ci=True))
    assert header == list(ablations.COLUMNS)
    assert [r[0] for r in rows] == [ablations.BY_NAME[n].label for n in ablations.RUN_ORDER]
    by_label = {r[0]: dict(zip(header, r)) for r in rows}
    for v in ablations.VARIANTS:
        assert by_label[v.label]["paper"] == v.paper
    for figure in ("13.6 -> 19.5", "13.6 -> 16.4", "13.6 -> 16.6", "122+ vs 14.7", "2.2x slower", "7x cheaper"):
        assert any(figure in r["paper"] for r in by_label.values()), figure
    verdict = {n: by_label[ablations.BY_NAME[n].label]["agrees?"] for n in ablations.RUN_ORDER}
    assert verdict["swd_full"] == "reference"
    assert verdict["no_mmd"] == "agrees" and verdict["noisy_upsampling"] == "agrees"
    assert verdict["mmd_pooled"] == "disagrees" and verdict["nearest"] == "within noise"
    assert verdict["full_resolution"] == "agrees"  # same quality, SwD 2x faster
    assert verdict["mmd_no_noise"] == "n/a"  # the failed one
    assert verdict["mmd_only"] == "agrees"  # 0.1 vs 0.5 s/step
    assert all(v in ALLOWED for n, v in verdict.items() if n != "swd_full")
    assert by_label[ablations.BY_NAME["no_mmd"].label]["FD [95% CI]"] == "120.0 [118.0, 122.0]"


def test_table_without_intervals_says_na():
    header, *rows = _rows(_table(ci=False))
    cells = [dict(zip(header, r)) for r in rows]
    assert all(c["agrees?"] == "n/a" for c in cells if c["variant"] != "SwD full (default)"
               and "MMD-only" not in c["variant"])  # MMD-only is judged on timing, which has no interval
    assert cells[0]["FD [95% CI]"] == "100.0 [n/a]"


# ----------------------------------------------------------------------------- end to end (slow)


def test_bench_end_to_end_tiny(ray_local, workdir, monkeypatch):
    """SwD full (a distill variant) and noisy-latent upsampling (a sampling variant reusing its student)."""
    import json

    from pipeline import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    rc = ablations.main(["--budget", "tiny", "--workdir", str(workdir), "--variants", "noisy_upsampling",
                         f"tracking.uri={uri}", *SMALL_DATA])
    assert rc == 0
    md = (workdir / "ablations" / "ablations.md").read_text()
    header, *rows = _rows(md)
    assert header == list(ablations.COLUMNS)
    assert [r[0] for r in rows] == ["SwD full (default)", "upsampling the noisy latent (sampler)"]
    cells = [dict(zip(header, r)) for r in rows]
    assert cells[1]["paper"] == "FID 122+ vs 14.7" and cells[1]["agrees?"] in ALLOWED
    assert cells[1]["distill s/step"].endswith("(SwD full's)")
    assert (workdir / "ablations" / "ablation_grid.png").is_file()
    results = json.loads((workdir / "ablations" / "ablations.json").read_text())
    assert results[0]["evaluate_dir"] != results[1]["evaluate_dir"]
    # the sampling variant reused the SwD-full student: one distill output only
    assert len([p for p in (workdir / "distill").iterdir() if (p / "manifest.json").is_file()]) == 1

    mlc = tracking.client(uri)
    exp = mlc.get_experiment_by_name("swd-ablations")
    parents = mlc.search_runs([exp.experiment_id], filter_string="tags.`pipeline.kind` = 'ablations'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = mlc.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["ablation.variant"] for c in children) == ["noisy_upsampling", "swd_full"]
    for c in children:
        assert "ablation_fd" in c.data.metrics and "ablation_latency_s" in c.data.metrics
        assert c.data.params["ablation.variant"] == c.data.tags["ablation.variant"]
        stage_runs = mlc.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{c.info.run_id}'")
        assert "evaluate" in {s.data.tags["stage"] for s in stage_runs}
    noisy = next(c for c in children if c.data.tags["ablation.variant"] == "noisy_upsampling")
    assert noisy.data.params["ablation.overrides"] == "evaluate.student_upsample_source=noisy"
    artifacts = {a.path for a in mlc.list_artifacts(parent.info.run_id)}
    assert {"ablations.md", "ablation_grid.png"} <= artifacts
