"""Step 4 of `evaluate`: every generator's latency, one after the other in one Ray task with the
resources of one generation actor (same process, same resources), and the student's per-scale
progression strip on the side."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.generate import Generator, GeneratorSpec
from pipeline.resources import worker_runtime_env

if TYPE_CHECKING:
    from stages.evaluate import Config


def measure_latency(specs: list[GeneratorSpec], prompts: list[str], cfg: Config, gpus: float,
                    strip_prompts: list[str]) -> dict[str, dict]:
    """{generator: seconds per image end to end and sampling alone, CPU seconds, the batch times and
    the sampler's steps}; the student's also holds "strip" (its progression, uint8)."""
    import ray

    task = ray.remote(num_cpus=cfg.num_cpus_per_actor, num_gpus=gpus, runtime_env=worker_runtime_env())(_latency_task)
    return ray.get(task.remote(specs, prompts, cfg.latency_warmup_batches, cfg.latency_repeats, strip_prompts))


def _latency_task(specs: list[GeneratorSpec], prompts: list[str], num_warmup: int, num_repeats: int,
                  strip_prompts: list[str]) -> dict[str, dict]:
    import gc

    from pipeline.teacher import load_bundle

    first = specs[0]
    bundle = load_bundle(first.location, first.dtype, first.device, first.local_files_only, first.load_t5,
                         first.max_sequence_length)
    out = {}
    for spec in specs:
        out[spec.name] = _time_generator(Generator(spec, bundle), prompts, num_warmup, num_repeats,
                                         strip_prompts if spec.name == "student" else None)
        # The generator is gone on return: free its memory before the next one is timed.
        gc.collect()
        if spec.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
    return out


def _time_generator(gen: Generator, prompts: list[str], num_warmup: int, num_repeats: int,
                    strip_prompts: list[str] | None) -> dict:
    """Seconds per image, end to end (text encoding + sampling + decode) and sampling alone."""
    from pipeline.metrics import time_batches

    n = len(prompts)
    full = time_batches(lambda: gen(prompts, 0), num_warmup, num_repeats, gen.sync)
    cond = gen.encode(prompts)
    sampling = time_batches(lambda: gen.sample(cond, 0), num_warmup, num_repeats, gen.sync)
    out = {"latency_s": full["median_s"] / n, "sampling_latency_s": sampling["median_s"] / n,
           "latency_cpu_s": full["cpu_median_s"] / n,
           "times_s": [round(t, 5) for t in full["times_s"]], "batch_size": n,
           "num_forwards": gen.num_forwards, "scales": gen.scales,
           "sigmas": [round(s, 5) for s in gen.sigmas], "guidance_scale": gen.guidance_scale}
    if strip_prompts is not None:
        side = gen(strip_prompts[:1], 0).shape[1]
        out["strip"] = gen.progression(strip_prompts, 0, side)
    return out


def latency_metrics(timing: dict[str, dict]) -> dict[str, float]:
    """`<name>_latency_s`, `_sampling_latency_s`, `_latency_cpu_s` per generator timed, and the
    student's speedups over the teacher and the baseline (wall and CPU time)."""
    values: dict[str, float] = {}
    for name, result in timing.items():
        values[f"{name}_latency_s"] = result["latency_s"]
        values[f"{name}_sampling_latency_s"] = result["sampling_latency_s"]
        values[f"{name}_latency_cpu_s"] = result["latency_cpu_s"]
    for other in ("teacher", "baseline"):
        if other in timing:
            values[f"speedup_vs_{other}"] = values[f"{other}_latency_s"] / values["student_latency_s"]
            values[f"speedup_vs_{other}_cpu"] = values[f"{other}_latency_cpu_s"] / values["student_latency_cpu_s"]
    return values
