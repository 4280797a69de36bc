"""Smoke test of the sampler benchmark (tiny shape, minimal repeats; the figures are not checked)."""

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_sampler.py"


def test_bench_sampler_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_sampler", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--batch-size", "1", "--teacher-steps", "2", "--repeats", "1", "--warmup", "0",
                             "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert result["scales"] == [8, 10, 12, 16] and result["latent_side"] == 16
    assert set(result["ms_per_image"]) >= {"swd", "teacher", "fullres", "forward"}
    assert json.loads(out.read_text())["speedup_vs_teacher"] > 0
    assert "speed-up vs teacher" in capsys.readouterr().out
