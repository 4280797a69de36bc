"""Small stage modules with the real stage shape, for testing the graph itself. Each records
that it ran (a line in $TOY_LOG) and writes one output file."""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

from pipeline.graph import StageSpec


def _make(name: str, sections: tuple[str, ...], slow: bool = False) -> types.ModuleType:
    mod = types.ModuleType(f"toy_{name}")
    mod.VERSION = "1"
    mod.SECTIONS = sections
    mod.OUTPUTS = ("out.txt",)

    def run(ctx):
        with open(os.environ["TOY_LOG"], "a") as log:
            log.write(name + "\n")
        text = ",".join(sorted((ctx.inputs[i] / "out.txt").read_text() for i in ctx.inputs)) + name
        (ctx.output_dir / "partial.txt").write_text("half")
        if slow:
            Path(os.environ["TOY_READY"]).touch()
            time.sleep(float(os.environ.get("TOY_SLEEP_S", 600)))  # the kill tests kill the process here
        if os.environ.get("TOY_FAIL") == name:
            raise RuntimeError(f"{name} failed on purpose")
        (ctx.output_dir / "out.txt").write_text(text)
        ctx.summary["chars"] = len(text)

    mod.run = run
    return mod


def toy_graph(slow_b: bool = False) -> list[StageSpec]:
    """a(data) -> b(tracking) ; c(ray) independent."""
    return [
        StageSpec("a", _make("a", ("data",))),
        StageSpec("b", _make("b", ("tracking",), slow=slow_b), inputs=("a",)),
        StageSpec("c", _make("c", ("ray",))),
    ]


if __name__ == "__main__":  # used by the kill and concurrency tests: the toy graph with a slow stage b
    from pipeline import graph
    from stages import load_config
    from pipeline.run import run_stages

    cfg = load_config(overrides=sys.argv[1:])
    force = set(filter(None, os.environ.get("TOY_FORCE", "").split(",")))
    planned = graph.plan(cfg, toy_graph(slow_b=True), force=force)
    uri = os.environ.get("TOY_TRACKING_URI") or f"sqlite:///{cfg.workdir / 'mlflow.db'}"
    sys.exit(run_stages(cfg, planned, uri, sys.argv[1:]))
