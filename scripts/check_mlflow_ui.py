"""Check in a real browser that the MLflow UI link the pipeline gives opens the runs table.

    python scripts/check_mlflow_ui.py [--chromium PATH] [--keep DIR]

Starts a real `mlflow server` on 127.0.0.1 (SQLite backend, temporary directory), records an
experiment with one parent run and one stage run through pipeline/tracking.py exactly as
`pipeline/run.py` does, loads `tracking.runs_page_url(...)` (the link README.md gives) in headless
Chromium (`apt-get install chromium`) and checks that the page is the experiment's runs table
showing the parent run by name, not MLflow's GenAI view (traces). For comparison it also loads the
experiment's plain address (`#/experiments/<id>`) and says which view that opened. Exit 0 when the
check passes, 1 when it fails, 2 when no Chromium is found. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
EXPERIMENT = "swd-ui-check"
# argv of a pipeline invocation; the parent run's name is derived from it
ARGV = ["data.generator.num_train_samples=64", "--only", "shards"]


def find_chromium(explicit: str | None = None) -> str | None:
    if explicit:
        return shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def record_runs(uri: str, workdir: Path) -> tuple[str, str, str]:
    """An experiment, a parent run and a finished `shards` stage run, the way pipeline/run.py
    makes them. Returns (experiment id, parent run id, parent run name)."""
    from pipeline import tracking
    from stages import load_config

    cfg = load_config([], [f"workdir={workdir}", f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}",
                           *[a for a in ARGV if "=" in a]])
    mlc = tracking.client(uri)
    exp_id = tracking.ensure_experiment(mlc, cfg.tracking.experiment, tracking.artifact_location(cfg, uri))
    parent = tracking.start_parent_run(mlc, exp_id, cfg, ARGV, ["shards"])
    child = tracking.start_stage_run(mlc, exp_id, parent, "shards", "0123456789abcdef", {"data.generator.seed": 0})
    mlc.log_metric(child, "stage_wall_s", 1.0)
    tracking.finish(mlc, child, "FINISHED")
    tracking.finish(mlc, parent, "FINISHED")
    return exp_id, parent, mlc.get_run(parent).info.run_name


def dump_dom(chromium: str, url: str, profile: Path, budget_ms: int = 20000, timeout_s: float = 90) -> str:
    """The page's DOM after `budget_ms` of virtual time, in a fresh browser profile (no remembered
    UI settings: what a first-time user sees)."""
    shutil.rmtree(profile, ignore_errors=True)
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
           f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0 or "<html" not in out.stdout.lower():
        raise RuntimeError(f"chromium exited {out.returncode}: {out.stderr[-2000:]}")
    return out.stdout


def text_of(dom: str) -> str:
    """The visible text of a DOM dump, roughly (scripts and styles and tags stripped)."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)).strip()


GENAI_NAV = ("Observability", "Judges", "Evaluation runs")  # in the sidebar of MLflow's GenAI view only


def view_of(dom: str, exp_id: str, run_id: str, run_name: str) -> str:
    """'runs table' when the model-training view's runs table lists the run by name (a link to the
    run in an ag-grid table), 'runs table in the GenAI view' when the table is there but under the
    GenAI sidebar, 'genai' for MLflow's GenAI view without it (Overview / Traces), else 'unknown'."""
    text = text_of(dom)
    genai = all(word in text for word in GENAI_NAV)
    row = re.search(rf'href="#/experiments/{re.escape(exp_id)}/runs/{re.escape(run_id)}"[^>]*>'
                    rf'(?:<[^>]+>)*{re.escape(html.escape(run_name, quote=False))}<', dom)
    if row and "ag-root" in dom:
        return "runs table in the GenAI view" if genai else "runs table"
    return "genai" if genai else "unknown"


def excerpt(text: str, around: str, width: int = 160) -> str:
    i = text.find(around)
    if i < 0:
        return text[:2 * width]
    return text[max(0, i - width):i + len(around) + width]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chromium", help=f"browser binary (default: the first of {', '.join(BROWSERS)} "
                                           "on PATH)")
    parser.add_argument("--keep", metavar="DIR", help="keep the server's files and the DOM dumps in DIR")
    parser.add_argument("--no-compare", action="store_true",
                        help="do not also load the plain experiment address (faster)")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("error: no Chromium found; install it (Debian: `apt-get update && apt-get install -y chromium`) "
              "or pass --chromium PATH", file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # MLflow's own "View run at" lines
    from pipeline import tracking

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="check-mlflow-ui-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc, uri = tracking.start_local_server(root)
    try:
        exp_id, parent, run_name = record_runs(uri, root / "workdir")
        print(f"[check] mlflow server {uri}: experiment {EXPERIMENT!r} ({exp_id}), parent run {run_name!r} ({parent})")
        link = tracking.runs_page_url(uri, exp_id)
        plain = f"{uri}/#/experiments/{exp_id}"
        results = {}
        pages = [("README link", link)] + ([] if args.no_compare else [("plain experiment address", plain)])
        for label, url in pages:
            dom = dump_dom(chromium, url, root / "chromium-profile")
            (root / f"{'link' if label == 'README link' else 'plain'}.html").write_text(dom)
            view = results[label] = view_of(dom, exp_id, parent, run_name)
            print(f"[check] {label} {url}: {view}")
            text = text_of(dom)
            around = run_name if view.startswith("runs table") else "Traces 0" if "Traces 0" in text else "Traces"
            print(f"        page text: ...{excerpt(text, around)}...")
    finally:
        tracking.stop_local_server(proc)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    ok = results["README link"] == "runs table"
    print(f"[check] {'OK' if ok else 'FAILED'}: the README link opens "
          f"{'the runs table with the parent run' if ok else results['README link']} "
          f"({time.monotonic() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
