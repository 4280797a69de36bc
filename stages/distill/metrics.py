"""The distill run's metrics: per-step terms summed over the log interval, averaged over it and over
ranks (one all-reduce), logged by rank 0 into the driver's stage run (`pipeline.run_log.RunLog`) with
one progress line; and the sample grid. A restarted worker logs only steps past both its checkpoint
and the last step already in MLflow (`after_step`), so no step is logged twice."""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

from pipeline.run_log import RunLog

PROGRESS_METRIC = "progress"  # logged with every batch of metrics: the last step in MLflow


class Interval:
    """Sums of the per-step terms since the last log."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # this process's CPU time (training thread, data decode, Ray)
        self.steps = 0
        self.last: dict[str, float] = {}

    def add(self, parts: dict, seconds: float, cpu_seconds: float = 0.0) -> None:
        for k, v in parts.items():
            self.sums.setdefault(k, 0.0)
            self.counts.setdefault(k, 0)
            if v is not None and math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1
        self.seconds += seconds
        self.cpu_seconds += cpu_seconds
        self.steps += 1
        self.last = parts


class Metrics:
    """Every rank adds its step terms; `log` is collective; only rank 0 writes to MLflow."""

    def __init__(self, tracking_uri: str, run_id: str, rank: int, world: int, device, num_steps: int,
                 scales: list[int], resumed_step: int):
        self.world, self.device, self.num_steps, self.scales = world, device, num_steps, scales
        self.interval = Interval()
        self.run_log = None
        if rank == 0:
            self.run_log = RunLog(tracking_uri, run_id)
            # Steps up to here are in MLflow already (or belong to the checkpoint this attempt resumed from).
            self.run_log.after_step = max(self.run_log.history_last_step(PROGRESS_METRIC), resumed_step)

    @property
    def last_logged(self) -> int | None:
        return None if self.run_log is None else self.run_log.after_step

    def add(self, parts: dict, seconds: float, cpu_seconds: float) -> None:
        self.interval.add(parts, seconds, cpu_seconds)

    def log(self, step: int, images_per_step: int, counters: dict) -> None:
        """Average every term over the interval and over ranks, then rank 0 logs them with `counters`
        (lr, skip counts, epoch) and prints the progress line; a new interval starts."""
        import torch
        import torch.distributed as dist

        interval, self.interval = self.interval, Interval()
        names = sorted(interval.sums)  # the same on every rank: skips are collective
        values = torch.tensor([interval.sums[n] for n in names] + [interval.counts[n] for n in names]
                              + [interval.seconds], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(values)
        if self.run_log is None:
            return
        values = values.tolist()
        means = {n: values[j] / values[len(names) + j] for j, n in enumerate(names) if values[len(names) + j]}
        seconds = values[-1] / self.world
        metrics = {f"loss/{n}": v for n, v in means.items() if n not in ("scale_index",) and not n.startswith("grad")}
        metrics.update({n: v for n, v in means.items() if n.startswith("grad_norm")})
        scale_index = interval.last.get("scale_index", 0.0)
        metrics.update({
            "scale_index": scale_index,
            "scale_side": float(self.scales[int(scale_index)]),
            "images_per_s": interval.steps * images_per_step / max(seconds, 1e-9),
            "s_per_step": seconds / max(interval.steps, 1),
            "cpu_s_per_step": interval.cpu_seconds / max(interval.steps, 1),
            **counters,
            PROGRESS_METRIC: step / self.num_steps,
        })
        self.run_log.metrics(metrics, step)
        left = (self.num_steps - step) * seconds / max(interval.steps, 1)
        losses = " ".join(f"{n} {means[n]:.4g}" for n in ("generator_total", "dmd", "mmd", "fake_total") if n in means)
        say(f"[distill] step {step}/{self.num_steps} scale {self.scales[int(scale_index)]} | {losses} | "
            f"{metrics['images_per_s']:.1f} img/s | {duration(left)} left")

    def grid(self, step: int, images: list, prompts: list[str]) -> None:
        """The sample grid: images per scale, pixels [B, 3, h, w] in [-1, 1], one row per prompt, one
        column per scale, upscaled (nearest) to the last size; with its prompts under samples/."""
        import numpy as np
        import torch
        import torch.nn.functional as F
        from PIL import Image

        if self.run_log is None or step <= self.run_log.after_step:
            return
        side = images[-1].shape[-1]
        cols = [F.interpolate(x.cpu(), size=(side, side), mode="nearest") for x in images]
        rows = torch.cat([torch.cat([c[b] for c in cols], dim=-1) for b in range(cols[0].shape[0])], dim=-2)
        array = ((rows.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            Image.fromarray(array).save(Path(tmp) / f"samples_step{step:06d}.png")
            (Path(tmp) / f"samples_step{step:06d}.txt").write_text("\n".join(prompts) + "\n")
            self.run_log.artifact(tmp, "samples")


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def say(line: str) -> None:
    """One line on the worker's stdout. Not `print`: Ray Train patches it to log *and* tee, which
    shows every line twice on the driver."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
