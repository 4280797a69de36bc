"""Benchmark: the `cache` stage's full Ray Data path vs the bare encoder forward, and its peak
memory at two dataset sizes, measured side by side in one run.

    python bench/bench_cache.py                          # tiny teacher (random weights), shapes dataset, CPU
    python bench/bench_cache.py --images 2048 --batch-size 64
    python bench/bench_cache.py --bundle /models/sd35-medium --dtype bfloat16 --image-side 1024 \
        --preset sd35-medium-4step --images 256 --batch-size 8
    python bench/bench_cache.py --bytes-only                # bytes per row, format 1 vs 2, from the layout alone

- bare: one encoder (`stages.cache.encoder.TeacherEncoder.forward`: the area downsampling of the uint8
  crops, every scale's z_i and stored z_im1, the prompt embeddings) on pre-decoded crops, same batch size, in a Ray task with the same resources
  as one encoder of the pool (so the same torch threads), after one warm-up batch; measured
  before and after the full runs (their mean is the reference, their spread the machine's noise).
- full: `stages.cache.run` on fresh shards: tar read, decode and area downsampling, the encoder actor
  pool, Parquet write and commit. At 1x and `--scale`x images. "end to end": rows / wall of the
  whole stage (Ray Data start-up, actor start and model load included); "steady": the stage's
  `rows_per_s_steady` (first to last encoded batch, the rate once the pipeline is full);
  "marginal": (rows_4x - rows_1x) / (wall_4x - wall_1x), fixed costs cancelled out.
- bytes per row (issue 15): cache tensor bytes (`pipeline.latent_cache.row_bytes`) and object-store pixel
  bytes (`stages.cache.encoder.transport_bytes_per_row`) of format 1 (every z_im1, CLIP zero-padded,
  float pixels of every scale) and format 2 (this code), for the tiny default and SD3.5-Medium 4-step
  shapes, plus the Parquet bytes per row the full runs wrote.
- peak memory: proportional set size (PSS: shared object-store pages split between the processes
  that map them) summed over this process and every process it started (the local Ray head, its
  workers), sampled every 0.2 s; reported above the level before the run.

Goal (issue 5): full / bare >= 0.9, and peak memory not growing with the dataset size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOAL_RATIO = 0.9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512, help="images of the 1x dataset")
    p.add_argument("--scale", type=int, default=4, help="the larger dataset is this many times the 1x one")
    p.add_argument("--images-per-shard", type=int, default=128)
    p.add_argument("--image-side", type=int, default=64, help="pixels of the generated images")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call (both paths)")
    p.add_argument("--decode-batch-size", type=int, default=16)
    p.add_argument("--num-encoders", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--bundle", type=Path, default=None, help="teacher directory (default: a random tiny bundle)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--preset", default=None, help="swd.preset (default: the config's)")
    p.add_argument("--bare-repeats", type=int, default=2, help="passes over the pre-decoded images")
    p.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--bytes-only", action="store_true", help="print the bytes-per-row table and stop")
    return p.parse_args(argv)


# (name, scales, latent channels, CLIP tokens, CLIP width, T5 tokens, joint width, T5 present, pooled width,
#  storage dtype, VAE scale factor, image side)
SHAPES = [("tiny default (4 scales, 16 latent)", [8, 10, 12, 16], 4, 16, 128, 0, 128, False, 128, "float32", 4, 64),
          ("SD3.5-Medium 4-step (1024 px)", [64, 80, 96, 128], 16, 77, 2048, 256, 4096, True, 2048, "bfloat16", 8, 1024)]


def bytes_table() -> list[dict]:
    """Bytes per row before (format 1) and after (format 2), from the layout alone."""
    from pipeline.latent_cache import row_bytes
    from stages.cache.encoder import transport_bytes_per_row
    from stages.cache.shard_keys import EncoderSpec

    out = []
    for name, scales, ch, lc, dc, l5, d, t5, pooled, dtype, factor, side in SHAPES:
        spec = EncoderSpec(location="", dtype=dtype, device="cpu", load_t5=t5, local_files_only=True,
                           posterior="mode", seed=0, storage_dtype=dtype, scales=scales, vae_scale_factor=factor)
        row = {v: row_bytes(scales, ch, lc, dc, l5, d, pooled, dtype, t5=t5, format_version=v) for v in (1, 2)}
        pixels = {v: transport_bytes_per_row(spec, side, format_version=v) for v in (1, 2)}
        out.append({"shape": name, "cache_row_bytes": row, "pixel_bytes": pixels})
    print("\n| shape | cache row before | after | z_im1 before / after | prompt_embeds before / after | "
          "object-store pixels before | after |\n|---|---|---|---|---|---|---|")
    for r in out:
        a, b = r["cache_row_bytes"][1], r["cache_row_bytes"][2]
        print(f"| {r['shape']} | {a['total']:,} | {b['total']:,} ({b['total'] / a['total'] - 1:+.1%}) | "
              f"{a['z_im1']:,} / {b['z_im1']:,} | {a['prompt_embeds']:,} / {b['prompt_embeds']:,} | "
              f"{r['pixel_bytes'][1]:,} | {r['pixel_bytes'][2]:,} ({r['pixel_bytes'][1] / r['pixel_bytes'][2]:.1f}x less) |")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    layout_bytes = bytes_table()
    if args.bytes_only:
        if args.json:
            args.json.write_text(json.dumps({"bytes": layout_bytes}, indent=1) + "\n")
        return 0
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-cache-"))
    root.mkdir(parents=True, exist_ok=True)
    import ray

    from pipeline import tiny
    from pipeline.latent_cache import vae_scale_factor
    from pipeline.resources import actor_device, gpus_per_actor
    from pipeline.swd.config import SwdConfig
    from stages import cache
    from stages import teacher as teacher_stage
    from stages.cache.shard_keys import EncoderSpec

    bundle = args.bundle or (root / "tiny" if (root / "tiny" / "model_index.json").is_file()
                             else tiny.build_bundle(root / "tiny"))
    big = args.images * args.scale
    urls = make_shards(root / "shards", big, args.images_per_shard, args.image_side)
    first = urls[: max(1, args.images // args.images_per_shard)]
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
    gpus = gpus_per_actor(None)
    swd = SwdConfig(preset=args.preset) if args.preset else SwdConfig()
    cfg = cache.Config(batch_size=args.batch_size, decode_batch_size=args.decode_batch_size,
                       num_encoders=args.num_encoders, max_bad_fraction=0.0, log_every_s=600)
    teacher = teacher_stage.Config(pretrained=str(bundle), dtype=args.dtype)
    spec = EncoderSpec(location=str(bundle), dtype=args.dtype, device=actor_device(gpus),
                       load_t5="auto", local_files_only=True, posterior="mode", seed=0,
                       storage_dtype=args.dtype, scales=list(swd.schedule.scales),
                       vae_scale_factor=vae_scale_factor(bundle))
    print(f"[bench] {ray.cluster_resources().get('CPU')} CPU(s), {gpus:.0f} GPU(s); scales {spec.scales} "
          f"(pixels {spec.pixel_sides}); batch {args.batch_size}; data in {root}", flush=True)

    bare_task = ray.remote(num_cpus=cfg.num_cpus_per_encoder, num_gpus=gpus)(bare_forward)

    def measure_bare(when: str) -> dict:
        out = ray.get(bare_task.remote(spec, first, args.batch_size, args.bare_repeats))
        print(f"[bench] bare encoder forward ({when}): {out['images_per_s']:.1f} images/s ({out['images']} images x "
              f"{args.bare_repeats}, {out['threads']} torch thread(s))", flush=True)
        return out

    bare_runs = [measure_bare("before")]

    full = {}
    for name, shard_urls in (("1x", first), (f"{args.scale}x", urls)):
        full[name] = run_stage(root / f"run-{name}", bundle, shard_urls, cfg, swd, teacher)
        f = full[name]
        print(f"[bench] full path {name}: {f['rows']} images in {f['wall_s']:.1f} s = {f['images_per_s']:.1f} "
              f"images/s end to end; peak memory +{f['peak_pss_gib']:.2f} GiB over {f['base_pss_gib']:.2f} GiB; "
              f"{f['parquet_bytes_per_row']:,.0f} Parquet bytes per row",
              flush=True)
    bare_runs.append(measure_bare("after"))  # the spread of the two shows how noisy the machine is
    cpu = {k: min(b["cpu_ms_per_image"][k] for b in bare_runs) for k in bare_runs[0]["cpu_ms_per_image"]}
    bare = {"images": bare_runs[0]["images"], "wall_s": sum(b["wall_s"] for b in bare_runs) / 2,
            "images_per_s": sum(b["images_per_s"] for b in bare_runs) / 2}
    a, b = full["1x"], full[f"{args.scale}x"]
    marginal = (b["rows"] - a["rows"]) / (b["wall_s"] - a["wall_s"]) if b["wall_s"] > a["wall_s"] else None
    rate = bare["images_per_s"]
    result = {
        "device": "cuda" if gpus else "cpu", "cpus": ray.cluster_resources().get("CPU"), "dtype": args.dtype,
        "batch_size": args.batch_size, "scales": spec.scales, "image_side": args.image_side,
        "bare_images_per_s": round(rate, 2),
        "bare_images_per_s_before_after": [round(b["images_per_s"], 2) for b in bare_runs],
        "full": {k: {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()}
                 for k, v in full.items()},
        "ratio_steady": {k: round(v["steady_images_per_s"] / rate, 3) for k, v in full.items()},
        "ratio_end_to_end": {k: round(v["images_per_s"] / rate, 3) for k, v in full.items()},
        "ratio_marginal": round(marginal / rate, 3) if marginal else None,
        "peak_memory_growth_gib": round(b["peak_pss_gib"] - a["peak_pss_gib"], 3),
        "cpu_ms_per_image": {k: round(v, 3) for k, v in cpu.items()},
        "goal_ratio": GOAL_RATIO,
        "bytes": layout_bytes,
    }
    print("\n| path | images | wall s | images/s end to end | images/s steady | steady / bare | "
          "end to end / bare | peak memory over base (GiB) |\n|---|---|---|---|---|---|---|---|")
    before, after = (f"{b['images_per_s']:.1f}" for b in bare_runs)
    print(f"| bare forward (mean of {before} before, {after} after) | {bare['images'] * args.bare_repeats} | "
          f"{bare['wall_s']:.1f} | {rate:.1f} | {rate:.1f} | 1.00 | 1.00 | |")
    for name, f in full.items():
        print(f"| full {name} | {f['rows']} | {f['wall_s']:.1f} | {f['images_per_s']:.1f} | "
              f"{f['steady_images_per_s']:.1f} | {f['steady_images_per_s'] / rate:.2f} | "
              f"{f['images_per_s'] / rate:.2f} | {f['peak_pss_gib']:.2f} |")
    if marginal:
        print(f"| full, marginal {args.scale}x - 1x | {b['rows'] - a['rows']} | {b['wall_s'] - a['wall_s']:.1f} | "
              f"{marginal:.1f} | | | {marginal / rate:.2f} | |")
    overhead = cpu["read"] + cpu["decode"] + cpu["rows"]
    print(f"\nCPU ms per image (one process, one thread): read {cpu['read']:.2f}, decode "
          f"{cpu['decode']:.2f}, encoder forward (area downsampling included) {cpu['forward']:.2f}, cache rows {cpu['rows']:.2f}; "
          f"everything but the forward = {overhead / cpu['forward']:.0%} of it")
    print(f"goal full / bare >= {GOAL_RATIO}: steady {result['ratio_steady']}, end to end "
          f"{result['ratio_end_to_end']}, marginal {result['ratio_marginal']}; peak memory {args.scale}x - 1x: "
          f"{result['peak_memory_growth_gib']:+.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    ray.shutdown()
    return 0


def make_shards(directory: Path, images: int, per_shard: int, side: int) -> list[str]:
    """The procedural shapes dataset (what the embedded default trains on), reused across runs."""
    import webdataset as wds

    from pipeline import shapes

    directory.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard, start in enumerate(range(0, images, per_shard)):
        path = directory / f"train-{side}px-{per_shard}-{shard:05d}.tar"
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            with wds.TarWriter(str(tmp)) as sink:
                for index in range(start, min(start + per_shard, images)):
                    sink.write(shapes.make_sample(0, "train", index, side, list(shapes.SHAPES),
                                                  list(shapes.COLOURS_RGB), list(shapes.SIZES_CELL_FRACTION),
                                                  list(shapes.BACKGROUNDS_RGB)))
            os.replace(tmp, path)
        urls.append(str(path))
    return urls


def bare_forward(spec, urls: list[str], batch_size: int, repeats: int) -> dict:
    """In a Ray task: decode everything first (not timed), then time the encoders. Also the CPU time
    per image of each part of the full path, one after the other in this process (CPU time is much
    less sensitive than wall time to other load on the machine)."""
    import numpy as np
    import pyarrow as pa
    import torch

    from pipeline.latent_cache import rows_table, text_layout
    from stages.cache.encoder import TeacherEncoder, decode_images
    from stages.cache.rounds import read_shard, sample_schema

    def cpu_ms(fn, n):
        start = time.process_time()
        out = fn()
        return out, 1000 * (time.process_time() - start) / n

    read = lambda: [r for url in urls for chunk, _ in read_shard(url, "bench") for r in chunk]  # noqa: E731
    rows = read()
    table = pa.Table.from_pylist(rows, schema=sample_schema())
    decode_images(table.slice(0, 4), spec)  # imports
    n = len(rows)
    _, read_ms = cpu_ms(read, n)
    decoded, decode_ms = cpu_ms(lambda: decode_images(table, spec), n)
    batches = [{k: v[i:i + batch_size] for k, v in decoded.items()} for i in range(0, n, batch_size)]
    encoder = TeacherEncoder(spec)
    encoder.forward(batches[0])  # warm-up
    sync = torch.cuda.synchronize if spec.device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    cpu_start = time.process_time()
    for _ in range(repeats):
        for batch in batches:
            out = encoder.forward(batch)
    sync()
    wall = time.perf_counter() - start
    forward_ms = 1000 * (time.process_time() - cpu_start) / (n * repeats)
    outputs = [encoder.forward(b) for b in batches]
    layout = text_layout(encoder.bundle, outputs[0]["prompt_embeds"].shape)
    _, rows_ms = cpu_ms(lambda: [rows_table(list(b["key"]), list(b["prompt"]), list(b["shard_key"]), o,
                                            encoder.columns, layout)
                                 for b, o in zip(batches, outputs)], n)  # tensors -> cache rows (bytes, Arrow)
    assert np.isfinite(out["z_0"].float().cpu().numpy()).all()
    return {"images": n, "wall_s": wall, "images_per_s": n * repeats / wall, "threads": torch.get_num_threads(),
            "cpu_ms_per_image": {"read": read_ms, "decode": decode_ms, "forward": forward_ms,
                                 "rows": rows_ms}}


def run_stage(root: Path, bundle: Path, urls: list[str], cfg, swd, teacher) -> dict:
    """`stages.cache.run` on fresh shared/scratch dirs (so every shard is encoded), timed, with the
    peak PSS of this process tree."""
    import mlflow

    from pipeline.context import StageContext
    from stages import cache

    shutil.rmtree(root, ignore_errors=True)
    for d in ("shards-out", "teacher-out", "out", "scratch", "shared"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "shards-out" / "shards.json").write_text(json.dumps({"train": [{"url": u} for u in urls], "eval": []}))
    (root / "teacher-out" / "teacher.json").write_text(json.dumps({"source": "pretrained", "location": str(bundle)}))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("bench-cache", (root / "artifacts").as_uri())).info.run_id
    ctx = StageContext(name="cache", config=cfg, sections={"cache": cfg, "swd": swd, "teacher": teacher},
                       inputs={"shards": root / "shards-out", "teacher": root / "teacher-out"},
                       output_dir=root / "out", scratch_dir=root / "scratch", shared_dir=root / "shared",
                       tracking_uri=uri, run_id=run_id, fingerprint="bench")
    with PeakMemory() as mem:
        start = time.perf_counter()
        cache.run(ctx)
        wall = time.perf_counter() - start
    rows = ctx.summary["rows"]
    parquet = sum(f.stat().st_size for f in (root / "shared").rglob("*.parquet"))
    return {"rows": rows, "wall_s": wall, "images_per_s": rows / wall, "parquet_bytes_per_row": parquet / max(rows, 1),
            "steady_images_per_s": ctx.summary.get("rows_per_s_steady", float("nan")),
            "base_pss_gib": mem.base / 2**30, "peak_pss_gib": (mem.peak - mem.base) / 2**30}


class PeakMemory:
    """Peak of the summed PSS of this process and all its descendants (local Ray head and workers)."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.base, self.peak = every_s, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def total() -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _loop(self):
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.total())

    def __enter__(self):
        self.base = self.peak = self.total()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.total())


if __name__ == "__main__":
    sys.exit(main())
