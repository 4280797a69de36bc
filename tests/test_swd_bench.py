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


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_sampler", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_flop_model_matches_counted_matmuls():
    """The FLOP model's weight matmuls equal what torch counts in a real forward (dual attention in
    block 0, a context-pre-only last block); attention is the 4 L^2 d term on top."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.bench_models import TEST, build_transformer, random_text_cond, transformer_flops
    from pipeline.swd.sampler import TextCond, velocity

    model = build_transformer("test")
    cond = TextCond(*random_text_cond("test", 1))
    with FlopCounterMode(display=False) as counter:
        velocity(model, torch.randn(1, 4, 8, 8), 1.0, cond)
    counted = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                  if name.split(".")[-1] in {"attn", "attn2", "ff", "ff_context"}
                  or name.split(".")[-1] in {"pos_embed", "context_embedder", "proj_out"} and name.count(".") == 1)
    assert counted == transformer_flops("test", 16, 5, attention=False)
    d = TEST["num_attention_heads"] * TEST["attention_head_dim"]
    attention = 3 * 4 * (16 + 5) ** 2 * d + 4 * 16 ** 2 * d  # 3 joint attentions, 1 dual
    assert transformer_flops("test", 16, 5) - transformer_flops("test", 16, 5, attention=False) == attention


def test_flop_model_sd35_medium_schedules():
    from pipeline.bench_models import reduced_depth, schedule_flops
    from pipeline.swd.schedules import PRESETS

    four, six = PRESETS["sd35-medium-4step"].scales, PRESETS["sd35-medium-6step"].scales
    assert 2.0 < schedule_flops("sd35-medium", four, 333) < 2.1    # issue 15: about 2.1 full-res forwards
    assert 2.2 < schedule_flops("sd35-medium", six, 333) < 2.3
    assert schedule_flops("sd35-medium", [128] * 4, 333) == 4.0
    two = reduced_depth("sd35-medium", 2)
    assert two["num_layers"] == 2 and two["dual_attention_layers"] == [0]
    assert abs(schedule_flops(two, four, 333) / schedule_flops("sd35-medium", four, 333) - 1) < 0.05
    predicted = _bench_module().flop_predictions(two, {"swd": list(four), "swd6": list(six)}, 128, 333, 28)
    assert predicted["swd"]["speedup_vs_fullres"] == 4.0 / predicted["swd"]["fullres_forwards"]
    assert predicted["swd6"]["speedup_vs_teacher"] == 56.0 / predicted["swd6"]["fullres_forwards"]
    assert predicted["fullres_forwards"]["teacher"] == 56.0
