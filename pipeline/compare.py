"""`python pipeline/run.py compare [--last N] [--config FILE ...] [key.sub=value ...]`: recent pipeline
runs side by side, from MLflow.

Steps: resolve the config (for `tracking.uri` / `tracking.experiment`, as the pipeline would) -> find
the experiment's parent runs (tag `pipeline.kind` = pipeline), newest first, at most N -> print
1. the canonical metrics of each run (mirrored onto the parent run by the evaluate stage), and
2. the config keys whose values differ between those runs (the parent run's params are the
   flattened resolved config), one row per key, one column per run.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

EXIT_OK, EXIT_NO_RUNS, EXIT_CONFIG, EXIT_TRACKING = 0, 1, 2, 3


def canonical_metrics() -> tuple[str, ...]:
    from pipeline.eval_record import CANONICAL_METRICS

    return CANONICAL_METRICS


def main(argv: list[str], load_config: Callable) -> int:
    """`load_config(config_files, overrides)`: the tree's loader (`stages.load_config`, from run.py)."""
    from pipeline import config as config_mod
    from pipeline import tracking

    args = _parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except config_mod.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        uri = tracking.reachable_uri(cfg)
    except tracking.TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_TRACKING
    runs = recent_runs(tracking.client(uri), cfg.tracking.experiment, args.last)
    if runs is None:
        print(f"error: experiment {cfg.tracking.experiment!r} does not exist at {uri}; run the pipeline first "
              f"(or set tracking.uri / tracking.experiment)", file=sys.stderr)
        return EXIT_NO_RUNS
    if not runs:
        print(f"no pipeline runs in experiment {cfg.tracking.experiment!r} at {uri}", file=sys.stderr)
        return EXIT_NO_RUNS
    print(f"# {len(runs)} most recent pipeline run(s) of experiment {cfg.tracking.experiment!r} ({uri})")
    print(render(runs))
    return EXIT_OK


def recent_runs(mlc, experiment: str, last: int) -> list | None:
    """The newest `last` parent runs (None when the experiment does not exist)."""
    exp = mlc.get_experiment_by_name(experiment)
    if exp is None:
        return None
    return list(mlc.search_runs([exp.experiment_id], filter_string="tags.`pipeline.kind` = 'pipeline'",
                                order_by=["attributes.start_time DESC"], max_results=last))


def render(runs: list) -> str:
    """Two tables: canonical metrics per run (with their 95% intervals where the evaluation logged them,
    and the paired differences' intervals), then the config keys that differ between the runs. An FD or
    FID column is shown only when every run that has it measured it under the same protocol."""
    import time

    from pipeline.bootstrap import is_real
    from pipeline.eval_record import INTERVAL_PAIRS, interval_of

    metrics = canonical_metrics()
    names = [r.info.run_id[:8] for r in runs]
    refused = protocol_conflicts(runs, metrics)
    metrics = tuple(m for m in metrics if m not in refused)
    diffs = tuple(f"{a}_minus_{b}_{m}" for a, b in INTERVAL_PAIRS for m in ("adherence", "fd")
                  if f"{a}_minus_{b}_{m}" not in refused)
    rows = []
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000))
        values = r.data.metrics
        cells = [_fmt(values.get(m)) + _interval(interval_of(values, m)) if m in values else "-" for m in metrics]
        for d in diffs:
            ci = interval_of(values, d)
            cells.append("-" if ci is None else f"[{ci[0]:.4g}, {ci[1]:.4g}] {'real' if is_real(*ci) else 'not real'}")
        rows.append([r.info.run_id[:8], started, r.info.status, *cells])
    columns = [*metrics, *(f"{d} 95% CI" for d in diffs)]
    shown = [i for i in range(len(columns)) if any(row[3 + i] != "-" for row in rows)]
    headers = ["run", "started", "status", *[columns[i] for i in shown]]
    table = [[*row[:3], *[row[3 + i] for i in shown]] for row in rows]
    out = ["## metrics", format_table(headers, table)]
    if not shown:
        out.append("(no canonical metrics yet: these runs did not reach the evaluate stage)")
    elif any("_ci95_" in k for r in runs for k in r.data.metrics):
        out.append("[low, high]: paired bootstrap 95% interval over the eval prompts; a difference is real when its "
                   "interval excludes 0.")
    for metric, why in refused.items():
        out.append(f"refused: {metric} not compared: {why}")

    diff = config_differences([r.data.params for r in runs])
    out += ["", "## config differences"]
    if len(runs) < 2:
        out.append("(one run: nothing to compare)")
    elif not diff:
        out.append("(identical configs)")
    else:
        out.append(format_table(["key", *names], [[k, *vals] for k, vals in diff.items()]))
    return "\n".join(out)


def protocol_conflicts(runs: list, metrics: tuple[str, ...]) -> dict[str, str]:
    """{metric: why} for each FD / FID metric (and FD difference) that runs measured under different
    protocols (`fd_protocol_id` / `fid_protocol_id`; a run without the id counts as its own unknown protocol)."""
    out = {}
    from pipeline.eval_record import INTERVAL_PAIRS

    guarded = [m for m in metrics if m.endswith(("_fd", "_fid"))] + [f"{a}_minus_{b}_fd" for a, b in INTERVAL_PAIRS]
    for m in guarded:
        kind = "fid" if m.endswith("_fid") else "fd"
        have = [r for r in runs if m in r.data.metrics or f"{m}_ci95_low" in r.data.metrics]
        ids = {r.info.run_id[:8]: r.data.metrics.get(f"{kind}_protocol_id") for r in have}
        if len(set(ids.values())) > 1:
            listed = ", ".join(f"{run} {'unknown' if i is None else format(int(i), 'x')}" for run, i in ids.items())
            out[m] = (f"the runs measured it under different {kind.upper()} protocols ({listed}); see each evaluate "
                      f"run's {kind}_protocol tag or metrics.json 'protocols' (extractor, weights, resize, side, "
                      f"samples, reference)")
    return out


def _interval(ci) -> str:
    return "" if ci is None else f" [{ci[0]:.4g}, {ci[1]:.4g}]"


def config_differences(params: list[dict[str, Any]]) -> dict[str, list[str]]:
    """{key: [value per run]} for every key whose value is not the same in all runs ("-": absent)."""
    keys = sorted(set().union(*params)) if params else []
    out = {}
    for key in keys:
        values = [str(p[key]) if key in p else "-" for p in params]
        if len(set(values)) > 1:
            out[key] = [_short(v) for v in values]
    return out


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table (Markdown pipe syntax, readable in a terminal)."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _short(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[:limit - 3] + "..."


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline/run.py compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--last", type=int, default=5, metavar="N", help="how many recent pipeline runs (default 5)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML layered on top of pipeline.yaml, as for a pipeline run (for tracking.*)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (e.g. tracking.uri=...)")
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error(f"--last {args.last}: must be >= 1")
    return args
