"""Paired lever screen: trained students side by side on many fresh prompts, so that a lever's effect on
prompt adherence is resolved to about +-0.02 instead of the evaluate stage's +-0.06.

    python bench/levers.py DISTILL_DIR [DISTILL_DIR ...] [--prompts 2048] [--guidance-scale 3]
                           [--teacher-steps 28] [--batch-size 64] [--threads 2] [--seed 0] [--out FILE.md]

Why: the evaluate stage scores the eval split (256 prompts in the embedded default); the paired
interval of student - teacher adherence there is about +-0.06, wider than most levers move it.

Steps:
1. N prompts of the shapes grammar from their own split ("screen": disjoint from train and eval).
2. The teacher of the first distill output (its manifest's `teacher` input) samples them once with its
   Euler sampler and CFG (as the evaluate stage's teacher), the j-th batch of prompts with seed
   seed + 1000 + j; the per-prompt oracle results are kept in `<cache dir>/` keyed by teacher, N and sampler.
3. Every distill output's scale-wise student samples the same prompts with the same seeds.
4. Per student: oracle adherence (all attributes right) and its parts, the paired bootstrap 95%
   interval of student - teacher and of student - the first student (the same resampled prompts for
   all), and the config keys in which its distill manifest differs from the first one's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import bootstrap, oracle, shapes  # noqa: E402
from pipeline.generate import Generator, GeneratorSpec  # noqa: E402
from pipeline.teacher import bundle_location  # noqa: E402

SPLIT = "screen"  # the prompts' own split of the shapes grammar, disjoint from "train" and "eval"
NOISE_SEED_OFFSET = 1000  # batch j samples with seed + 1000 + j: a stream apart from the prompts'
PARTS = ("shape", "colour", "position", "size", "background")


def lever_prompts(n: int, seed: int) -> list[shapes.Attributes]:
    """n attributes drawn from the shapes grammar's full vocabulary, split SPLIT."""
    return [shapes.sample_attributes(shapes.sample_rng(seed, SPLIT, i), shapes.SHAPES, tuple(shapes.COLOURS_RGB),
                                     tuple(shapes.SIZES_CELL_FRACTION), tuple(shapes.BACKGROUNDS_RGB))
            for i in range(n)]


def oracle_hits(generator, targets: list[shapes.Attributes], batch_size: int, seed: int) -> np.ndarray:
    """bool [n, len(PARTS) + 1]: each attribute right, and all of them (last column)."""
    prompts = [t.prompt() for t in targets]
    rows = []
    for start in range(0, len(prompts), batch_size):
        images = generator(prompts[start:start + batch_size], seed + NOISE_SEED_OFFSET + start // batch_size)
        for image, want in zip(images, targets[start:start + batch_size], strict=True):
            got = oracle.recover(image)
            rows.append([getattr(got, k) == getattr(want, k) for k in PARTS])
    hits = np.array(rows, dtype=bool)
    return np.concatenate([hits, hits.all(axis=1, keepdims=True)], axis=1)


def config_diff(sections: dict, reference: dict, prefix: str = "") -> list[str]:
    """`key.sub=value` for every leaf of `sections` that differs from `reference`."""
    out = []
    for key, value in sections.items():
        name = f"{prefix}{key}"
        other = reference.get(key) if isinstance(reference, dict) else None
        if isinstance(value, dict):
            out += config_diff(value, other if isinstance(other, dict) else {}, f"{name}.")
        elif value != other:
            out.append(f"{name}={json.dumps(value)}")
    return out


def manifest(distill_dir: Path) -> dict:
    path = distill_dir / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"{distill_dir}: no manifest.json; expected a committed distill output "
                         "(workdir/distill/<fingerprint>/)")
    return json.loads(path.read_text())


def interval(diff: np.ndarray, idx: np.ndarray) -> str:
    low, high = bootstrap.percentile_interval(bootstrap.mean_resamples(diff, idx))
    return f"{diff.mean():+.3f} [{low:+.3f}, {high:+.3f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("distill_dirs", nargs="+", type=Path, help="distill outputs (workdir/distill/<fingerprint>)")
    p.add_argument("--prompts", type=int, default=2048, help="fresh prompts (paired interval ~ 1 / sqrt(n))")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="the teacher's CFG (evaluate.teacher_sampler)")
    p.add_argument("--teacher-steps", type=int, default=28, help="the teacher's Euler steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the sampling noise")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--cache-dir", type=Path, default=Path("workdir/levers"), help="the teacher's results")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.prompts < 2:
        p.error(f"--prompts {args.prompts}: need at least 2 for an interval")

    manifests = [manifest(d) for d in args.distill_dirs]
    location = bundle_location(manifests[0]["inputs"]["teacher"])
    targets = lever_prompts(args.prompts, args.seed)

    def spec(name: str, student_dir: Path | None = None) -> GeneratorSpec:
        return GeneratorSpec(name=name, location=location, dtype="float32", device="cpu", load_t5="auto",
                             local_files_only=True, num_threads=args.threads,
                             student_dir=None if student_dir is None else str(student_dir),
                             teacher_num_steps=args.teacher_steps, guidance_scale=args.guidance_scale)

    key = hashlib.sha256(json.dumps([str(Path(location).resolve()), args.prompts, args.seed, args.guidance_scale,
                                     args.teacher_steps, args.batch_size]).encode()).hexdigest()[:16]
    cached = args.cache_dir / f"teacher-{key}.npy"
    started = time.perf_counter()
    if cached.is_file():
        teacher = np.load(cached)
    else:
        teacher = oracle_hits(Generator(spec("teacher")), targets, args.batch_size, args.seed)
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, teacher)
    students = [oracle_hits(Generator(spec("student", d)), targets, args.batch_size, args.seed)
                for d in args.distill_dirs]

    idx = bootstrap.resample_indices(args.prompts, args.resamples, args.seed)
    t_all = teacher[:, -1].astype(float)
    lines = [f"{args.prompts} prompts (split {SPLIT!r}, seed {args.seed}); teacher {location}, "
             f"{args.teacher_steps} steps, CFG {args.guidance_scale:g}: adherence {t_all.mean():.3f} "
             f"(shape {teacher[:, 0].mean():.3f}, size {teacher[:, 3].mean():.3f}); 95% paired bootstrap "
             f"intervals; {time.perf_counter() - started:.0f} s", "",
             "| distill output | overrides vs the first | adherence | - teacher [95% CI] | - first [95% CI] "
             "| shape | size | colour |", "|---|---|---|---|---|---|---|---|"]
    first = students[0][:, -1].astype(float)
    for d, m, hits in zip(args.distill_dirs, manifests, students, strict=True):
        s_all = hits[:, -1].astype(float)
        diff = " ".join(config_diff(m["sections"], manifests[0]["sections"])) or "-"
        lines.append(f"| {d.name} | {diff} | {s_all.mean():.3f} | {interval(s_all - t_all, idx)} | "
                     f"{interval(s_all - first, idx)} | {hits[:, 0].mean():.3f} | {hits[:, 3].mean():.3f} | "
                     f"{hits[:, 1].mean():.3f} |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
