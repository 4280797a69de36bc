"""Benchmark: the `synthesize` stage's images/s vs the bare teacher sampler on the same prompts,
batch size and resources, measured side by side in one run.

    python bench/bench_synthesize.py                      # shipped tiny teacher, 128 prompts, CPU
    python bench/bench_synthesize.py --prompts 512 --batch-size 32 --steps 28
    python bench/bench_synthesize.py --bundle /models/sd35-medium --dtype bfloat16 --prompts 64 --batch-size 8

- bare: `stages.synthesize.generate_images` (text encoding, the teacher's Euler sampler with CFG,
  VAE decode; one noise tensor per sample) in a loop over the prompts, in a Ray task with the
  resources of one generation actor (so the same torch threads), after one warm-up batch; measured
  before and after the stage (their mean is the reference, their spread the machine's noise).
- stage: the pipeline's shards -> teacher -> synthesize stages on a prompt file of the same
  prompts: Ray Data, the actor pool, PNG encoding, shard writing. "steady": the stage's own
  `images_per_s` (from the first to the last batch back, the first batch not counted: actor
  start and model load excluded); "end to end": images / the stage's wall time.

Goal (issue 9): stage / bare >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOAL_RATIO = 0.9
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per sampler call (both paths)")
    p.add_argument("--steps", type=int, default=28, help="teacher Euler steps")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--num-cpus-per-actor", type=float, default=2.0)
    p.add_argument("--bundle", type=Path, default=REPO_ROOT / "assets" / "tiny-teacher")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--workdir", type=Path, default=None, help="keep the run here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    import ray

    from pipeline.config import GeneratorConfig
    from pipeline.shapes import make_sample

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-synth-"))
    shutil.rmtree(root / "wd", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    g = GeneratorConfig()
    prompts = [make_sample(7, "train", i, 64, g.shapes, g.colours, g.sizes, g.backgrounds)["txt"]
               for i in range(args.prompts)]
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    gpus = 1.0 if _has_gpu() else 0.0
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "OMP_WAIT_POLICY": "PASSIVE"}})
    try:
        bare = ray.remote(num_cpus=args.num_cpus_per_actor, num_gpus=gpus)(bare_sampler)
        spec = generator_spec(args, gpus)
        before = ray.get(bare.remote(spec, prompts, args.batch_size))
        stage = run_stage(root, args)
        after = ray.get(bare.remote(spec, prompts, args.batch_size))
    finally:
        ray.shutdown()
    ref = (before["images_per_s"] + after["images_per_s"]) / 2
    result = {"prompts": args.prompts, "batch_size": args.batch_size, "steps": args.steps, "device": spec.device,
              "bare_images_per_s": [round(before["images_per_s"], 3), round(after["images_per_s"], 3)],
              "stage_steady_images_per_s": round(stage["images_per_s"], 3),
              "stage_end_to_end_images_per_s": round(stage["end_to_end"], 3),
              "stage_wall_s": round(stage["wall_s"], 1),
              "ratio_steady": round(stage["images_per_s"] / ref, 3),
              "ratio_end_to_end": round(stage["end_to_end"] / ref, 3)}
    print(f"bare sampler      {before['images_per_s']:.2f} / {after['images_per_s']:.2f} images/s (before / after)")
    print(f"stage, steady     {stage['images_per_s']:.2f} images/s  -> {result['ratio_steady']:.3f} x bare "
          f"(goal >= {GOAL_RATIO})")
    print(f"stage, end to end {stage['end_to_end']:.2f} images/s ({stage['wall_s']:.1f} s incl. Ray Data and actor "
          f"start) -> {result['ratio_end_to_end']:.3f} x bare")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def generator_spec(args, gpus: float):
    from stages.evaluate import GeneratorSpec
    from stages.synthesize import native_side

    native = native_side(args.bundle)
    return GeneratorSpec(name="teacher", location=str(args.bundle), dtype=args.dtype,
                         device="cuda" if gpus else "cpu", load_t5=False, local_files_only=True,
                         num_threads=max(1, int(args.num_cpus_per_actor)), teacher_num_steps=args.steps,
                         guidance_scale=args.guidance_scale,
                         latent_side=native["image_side_px"] // native["vae_scale_factor"])


def bare_sampler(spec, prompts: list[str], batch_size: int) -> dict:
    """The teacher loaded once, one warm-up batch, then every prompt in batches: images/s."""
    from stages.evaluate import Generator
    from stages.synthesize import generate_images, sample_seed

    gen = Generator(spec)
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    generate_images(gen, batches[0], [sample_seed(0, p, 0) for p in batches[0]])
    gen.sync()
    start = time.perf_counter()
    for batch in batches:
        generate_images(gen, batch, [sample_seed(0, p, 0) for p in batch])
    gen.sync()
    return {"images_per_s": len(prompts) / (time.perf_counter() - start)}


def run_stage(root: Path, args) -> dict:
    """shards (eval only) -> teacher (the bundle) -> synthesize on the prompt file, in this Ray."""
    from pipeline import graph
    import stages
    from pipeline.run import run_stages
    from stages import load_config

    cfg = load_config(overrides=[
        f"workdir={root / 'wd'}", f"teacher.pretrained={args.bundle}", f"teacher.dtype={args.dtype}",
        f"data.prompts={root / 'prompts.txt'}", "data.generator.num_eval_samples=8",
        "data.generator.samples_per_shard=8", f"synthesize.teacher_sampler.num_steps={args.steps}",
        f"synthesize.teacher_sampler.guidance_scale={args.guidance_scale}", f"synthesize.batch_size={args.batch_size}",
        f"synthesize.prompts_per_shard={max(args.batch_size, args.prompts // 4)}",
        f"synthesize.num_cpus_per_actor={args.num_cpus_per_actor}", "tracking.experiment=bench-synthesize"])
    planned = graph.plan(cfg, [s for s in stages.default_stages() if s.name in ("shards", "teacher", "synthesize")])
    start = time.monotonic()
    if run_stages(cfg, planned, f"sqlite:///{root / 'wd' / 'mlflow.db'}", []) != 0:
        raise SystemExit("the synthesize stage failed (see above)")
    wall = graph.read_manifest(planned[-1].output_dir).get("wall_s") or (time.monotonic() - start)
    summary = json.loads((planned[-1].output_dir / "synthesize.json").read_text())
    return {"images_per_s": summary["images_per_s"], "end_to_end": summary["images"] / wall, "wall_s": wall}


if __name__ == "__main__":
    sys.exit(main())
