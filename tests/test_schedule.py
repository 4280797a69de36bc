"""Scheduled retraining (pipeline/schedule.py): slot names, the same slot twice does nothing twice,
only shards added since the last success are new work, two overlapping runs do not both train, a
crashed run's lease is taken over, a run that lost its lease stops without recording its slot, the
champion reaches the distill stage as `distill.init_student` (or, when it cannot, the tag says why). The stage graph here is the real `shards` stage plus a small `train` stage
that logs what it trained on (the cache stage's per-shard reuse is in tests/test_schedule_cache.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import mlflow
import pytest

from pipeline import graph, schedule
from stages import load_config
from pipeline.run import run_stages
from stages import shards as shards_stage

REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- a small graph


def _train_module() -> types.ModuleType:
    """Logs the train shard names it saw (one line per run) to $SCHED_LOG; $SCHED_FAIL fails it;
    $SCHED_STEAL makes it write a takeover of its run's lease and then wait to be stopped."""
    mod = types.ModuleType("sched_train")
    mod.VERSION, mod.SECTIONS, mod.OUTPUTS = "1", ("data",), ("out.txt",)

    def run(ctx):
        listing = json.loads((ctx.inputs["shards"] / "shards.json").read_text())
        names = [Path(e["url"]).name for e in listing["train"]]
        with open(os.environ["SCHED_LOG"], "a") as log:
            log.write(",".join(names) + "\n")
        if os.environ.get("SCHED_FAIL"):
            raise RuntimeError("train failed on purpose")
        if os.environ.get("SCHED_STEAL"):
            lease_dir = Path(os.environ["SCHED_STEAL"])
            n = max(int(p.stem) for p in lease_dir.glob("*.json"))
            (lease_dir / f"{n + 1:012d}.json").write_text(json.dumps(
                {"owner": "other", "pid": 1, "host": "elsewhere", "expires_at": time.time() + 600}))
            for _ in range(1200):  # the renewal thread notices within ttl/3 and interrupts us
                time.sleep(0.05)
            Path(os.environ["SCHED_STEAL"]).with_name("not-interrupted").touch()
        if os.environ.get("SCHED_SLOW"):
            Path(os.environ["SCHED_SLOW"]).touch()
            time.sleep(8)
        (ctx.output_dir / "out.txt").write_text(",".join(names))

    mod.run = run
    return mod


def small_graph() -> list[graph.StageSpec]:
    return [graph.StageSpec("shards", shards_stage), graph.StageSpec("train", _train_module(), inputs=("shards",))]


def write_shard(root: Path, i: int, split: str = "train") -> Path:
    path = root / f"{split}-{i:03d}.tar"
    path.write_bytes(b"not read by these stages" * (i + 1))
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    for i in range(2):
        write_shard(tmp_path / "data", i)
    write_shard(tmp_path / "data", 0, "eval")
    monkeypatch.setenv("SCHED_LOG", str(tmp_path / "trained.log"))
    (tmp_path / "trained.log").write_text("")
    for var in ("SCHED_FAIL", "SCHED_STEAL", "SCHED_SLOW"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def overrides(root: Path, *extra: str) -> list[str]:
    return [f"workdir={root / 'wd'}", f"data.train_shards={root / 'data'}/train-*.tar",
            f"data.eval_shards={root / 'data'}/eval-000.tar", "tracking.experiment=sched", *extra]


def run_slot(root: Path, slot: str, *extra: str) -> int:
    cfg = load_config(overrides=overrides(root, *extra))
    uri = f"sqlite:///{root / 'wd' / 'mlflow.db'}"
    return schedule.run_scheduled(cfg, slot, uri, ["--schedule-slot", slot], plan=lambda c: graph.plan(c, small_graph()),
                                  init_ray=lambda c: None, run_stages=run_stages)


def trained(root: Path) -> list[str]:
    return (root / "trained.log").read_text().splitlines()


def client(root: Path):
    return mlflow.MlflowClient(f"sqlite:///{root / 'wd' / 'mlflow.db'}")


def runs_of_slot(root: Path, slot: str) -> list:
    mlc = client(root)
    exp = mlc.get_experiment_by_name("sched")
    return mlc.search_runs([exp.experiment_id], filter_string=f"tags.`schedule.slot` = '{slot}'")


# ----------------------------------------------------------------------------- slots


@pytest.mark.parametrize("slot_s, expected", [(86400, "2026-11-22"), (3600, "2026-11-22T0200Z"),
                                              (7 * 86400, "2026-11-19"), (90, "2026-11-22T024500Z")])
def test_auto_names_the_utc_slot_holding_now(slot_s, expected):
    now = 1795315535.0  # 2026-11-22 02:45:35 UTC
    assert schedule.resolve_slot("auto", slot_s, now) == expected


def test_slot_names_are_checked():
    assert schedule.resolve_slot("2026-11-22", 86400) == "2026-11-22"
    for bad in ("", "../x", "a b", "x" * 65, "-lead"):
        with pytest.raises(schedule.ScheduleError, match="expected 'auto' or a name of letters"):
            schedule.resolve_slot(bad, 86400)


def test_same_slot_twice_does_nothing_twice(env, capsys):
    assert run_slot(env, "2026-11-22") == 0
    assert trained(env) == ["train-000.tar,train-001.tar"]
    record = json.loads((env / "wd" / "schedule" / "slots" / "2026-11-22.json").read_text())
    assert record["outcome"] == "trained" and record["new_shards"][1].endswith("train-001.tar")
    (parent,) = [r for r in runs_of_slot(env, "2026-11-22") if r.data.tags.get("pipeline.kind") == "pipeline"]
    assert parent.data.tags["schedule.slot_done"] == "true" and parent.data.tags["schedule.new_shards"] == "2"
    assert record["run_id"] == parent.info.run_id and parent.info.status == "FINISHED"

    capsys.readouterr()
    assert run_slot(env, "2026-11-22") == 0
    assert "already done (trained by run" in capsys.readouterr().out
    assert trained(env) == ["train-000.tar,train-001.tar"]  # nothing ran
    assert len(runs_of_slot(env, "2026-11-22")) == 1  # and no new MLflow run

    # A workdir that lost its slot records still finds the slot done in MLflow.
    (env / "wd" / "schedule" / "slots" / "2026-11-22.json").unlink()
    assert run_slot(env, "2026-11-22") == 0
    assert f"by MLflow run {parent.info.run_id}" in capsys.readouterr().out
    assert len(trained(env)) == 1


def test_only_shards_added_since_the_last_success_are_new(env, capsys):
    assert run_slot(env, "d1") == 0
    # Nothing new: the slot is recorded as looked at, nothing trains.
    assert run_slot(env, "d2") == 0
    assert "no new train shards since slot d1" in capsys.readouterr().out
    assert len(trained(env)) == 1
    (skip,) = runs_of_slot(env, "d2")
    assert skip.data.tags["schedule.outcome"] == "no_new_shards" and skip.data.tags["schedule.slot_done"] == "true"
    assert json.loads((env / "wd" / "schedule" / "slots" / "d2.json").read_text())["outcome"] == "no_new_shards"
    # A new shard: the next slot trains, and the records name just that shard as new.
    write_shard(env / "data", 2)
    assert run_slot(env, "d3") == 0
    assert trained(env)[-1] == "train-000.tar,train-001.tar,train-002.tar"
    (parent,) = [r for r in runs_of_slot(env, "d3") if r.data.tags.get("pipeline.kind") == "pipeline"]
    assert parent.data.tags["schedule.new_shards"] == "1"
    assert parent.data.tags["schedule.new_shard_names"] == "train-002.tar"
    assert parent.data.tags["schedule.last_success_slot"] == "d1"
    last = json.loads((env / "wd" / "schedule" / "last_success.json").read_text())
    assert last["slot"] == "d3" and len(last["train_shards"]) == 3
    # A rewritten shard (new size) counts as new again.
    write_shard(env / "data", 0).write_bytes(b"rewritten" * 100)
    cfg = load_config(overrides=overrides(env))
    fresh = schedule.new_shards(schedule.shard_list(cfg.data.train_shards), last["train_shards"])
    assert [Path(s["url"]).name for s in fresh] == ["train-000.tar"]


def test_an_overlapping_run_does_not_train(env, capsys):
    holder = schedule.Lease(env / "wd" / "schedule" / "lease", 60, "other-slot")
    assert holder.acquire()  # this process, alive: a run in progress
    assert run_slot(env, "d1") == 0
    out = capsys.readouterr().out
    assert "another run holds the lease" in out and f"pid {os.getpid()} on {socket.gethostname()}" in out
    assert trained(env) == [] and not (env / "wd" / "schedule" / "slots" / "d1.json").exists()
    holder.release()
    assert run_slot(env, "d1") == 0 and len(trained(env)) == 1


def test_a_failed_run_records_nothing_releases_the_lease_and_the_slot_retries(env, monkeypatch):
    monkeypatch.setenv("SCHED_FAIL", "1")
    assert run_slot(env, "d1") == 1
    assert not (env / "wd" / "schedule" / "slots" / "d1.json").exists()
    lease = schedule.Lease(env / "wd" / "schedule" / "lease", 60)
    assert lease.current()["released"] is True
    monkeypatch.delenv("SCHED_FAIL")
    assert run_slot(env, "d1") == 0
    assert len(trained(env)) == 2  # the failed attempt and the retry
    assert json.loads((env / "wd" / "schedule" / "slots" / "d1.json").read_text())["outcome"] == "trained"


def test_a_run_that_loses_its_lease_stops_without_recording_its_slot(env, monkeypatch):
    monkeypatch.setenv("SCHED_STEAL", str(env / "wd" / "schedule" / "lease"))
    # A library may have replaced Python's SIGINT handler (then _thread.interrupt_main raises nothing).
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        assert run_slot(env, "d1", "schedule.lease_ttl_s=1.5") == schedule.EXIT_LEASE_LOST
    finally:
        signal.signal(signal.SIGINT, previous)
    # Stopped while it still had up to a minute to sleep (not by finishing); no wall-clock bound
    # on the whole run, which includes creating the MLflow store on a loaded machine.
    assert not (env / "wd" / "schedule" / "not-interrupted").exists()
    assert not (env / "wd" / "schedule" / "slots" / "d1.json").exists()
    (parent,) = [r for r in runs_of_slot(env, "d1") if r.data.tags.get("pipeline.kind") == "pipeline"]
    assert parent.info.status == "KILLED" and "schedule.slot_done" not in parent.data.tags
    assert schedule.Lease(env / "wd" / "schedule" / "lease", 1.5).current()["owner"] == "other"  # untouched


def champion_model(root: Path) -> Path:
    """A registered student as the register stage logs it: an MLflow model directory (MLmodel) whose
    artifact `export` is the distill export, i.e. artifacts/export/student/ holding the LoRA (tiny
    transformer, swd.student's default rank, alpha and target modules)."""
    from pipeline import tiny
    from pipeline.swd.config import StudentConfig
    from pipeline.student_export import save_student
    from pipeline.swd.networks import build_student

    model = root / "student"
    (model / "artifacts" / "export").mkdir(parents=True)
    (model / "MLmodel").write_text("flavors: {}\n")
    student, _ = build_student(tiny.build_transformer(num_layers=1), StudentConfig())
    save_student(student, model / "artifacts" / "export" / "student")
    return model


def test_warm_start_is_recorded(env):
    from pipeline.student_export import init_student_adapter

    assert run_slot(env, "d1") == 0
    (parent,) = [r for r in runs_of_slot(env, "d1") if r.data.tags.get("pipeline.kind") == "pipeline"]
    assert parent.data.tags["schedule.warm_start"] == "no champion yet: trained from the teacher"
    assert parent.data.params["distill.init_student"] == "None"
    # A champion in the registry: downloaded once, and the distill stage's init_student points at it.
    mlc = client(env)
    mlc.create_registered_model("swd-student")
    mlc.create_model_version("swd-student", source=str(champion_model(env / "champion-run")),
                             run_id=parent.info.run_id)
    mlc.set_registered_model_alias("swd-student", "champion", "1")
    write_shard(env / "data", 2)
    assert run_slot(env, "d2") == 0
    (parent,) = [r for r in runs_of_slot(env, "d2") if r.data.tags.get("pipeline.kind") == "pipeline"]
    downloaded = env / "wd" / "schedule" / "champions" / "swd-student-v1" / "student"
    assert parent.data.tags["schedule.warm_start"] == f"champion swd-student v1 ({downloaded})"
    assert parent.data.params["distill.init_student"] == str(downloaded)  # the config the stages ran with
    assert init_student_adapter(str(downloaded)) == downloaded / "artifacts/export/student/pytorch_lora_weights.safetensors"
    # A champion this config cannot continue from (another LoRA rank): not used, and the tag says why.
    assert run_slot(env, "d3", "swd.student.lora_rank=8", "schedule.skip_without_new_shards=false") == 0
    (parent,) = [r for r in runs_of_slot(env, "d3") if r.data.tags.get("pipeline.kind") == "pipeline"]
    assert parent.data.tags["schedule.warm_start"].startswith(
        "champion swd-student v1 not used: distill.init_student: the adapter ")
    assert "has lora_rank 64; swd.student has lora_rank 8" in parent.data.tags["schedule.warm_start"]
    assert parent.data.params["distill.init_student"] == "None"
    assert run_slot(env, "d4", "schedule.warm_start=false", "schedule.skip_without_new_shards=false") == 0
    (parent,) = [r for r in runs_of_slot(env, "d4") if r.data.tags.get("pipeline.kind") == "pipeline"]
    assert parent.data.tags["schedule.warm_start"] == "off"


# ----------------------------------------------------------------------------- the lease


def test_lease_acquire_renew_release(tmp_path):
    a = schedule.Lease(tmp_path / "lease", 30, "s1")
    b = schedule.Lease(tmp_path / "lease", 30, "s2")
    assert a.acquire() and not b.acquire()
    assert b.holder["owner"] == a.owner and b.holder["slot"] == "s1"
    before = a.current()["expires_at"]
    time.sleep(0.05)
    assert a.renew() and a.current()["expires_at"] > before
    first = a.number
    a.release()
    assert a.current()["released"] is True and b.acquire()
    assert b.number == first + 1 and [p.name for p in (tmp_path / "lease").glob("*.json")] == [f"{b.number:012d}.json"]
    assert not a.renew()  # released: nothing to renew


def test_an_expired_lease_of_another_host_is_taken_over_and_its_holder_learns_it(tmp_path):
    old = schedule.Lease(tmp_path / "lease", 0.5)
    assert old.acquire()
    path = tmp_path / "lease" / f"{old.number:012d}.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "host": "another-host"}))  # its pid means nothing here
    new = schedule.Lease(tmp_path / "lease", 30)
    assert not new.acquire()  # not expired yet
    time.sleep(0.6)
    assert new.acquire() and new.current()["taken_over"] == path.name
    assert not old.renew() and old.lost  # a holder that was only slow finds out at its next renewal


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(REPO_ROOT)!r})
        from pipeline.schedule import Lease
        assert Lease({str(tmp_path / 'lease')!r}, 3600).acquire()
        """)], timeout=120)  # exits (as if crashed) without releasing its hour-long lease
    assert proc.returncode == 0
    lease = schedule.Lease(tmp_path / "lease", 30)
    assert lease.current()["expires_at"] > time.time() + 3000
    assert lease.acquire()


def test_an_unreadable_lease_file_counts_as_held_until_it_would_have_expired(tmp_path):
    (tmp_path / "lease").mkdir()
    (tmp_path / "lease" / f"{0:012d}.json").write_text("{half a reco")
    assert not schedule.Lease(tmp_path / "lease", 60).acquire()
    time.sleep(0.2)
    assert schedule.Lease(tmp_path / "lease", 0.1).acquire()


RACER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from pipeline.schedule import Lease
go, out = Path({go!r}), Path({out!r})
lease = Lease({lease!r}, 60)
while not go.exists():
    time.sleep(0.01)
out.write_text("won" if lease.acquire() else "lost")
while not Path({done!r}).exists():  # stay alive (a live holder) until every racer has tried
    time.sleep(0.05)
"""


def test_racing_processes_exactly_one_takes_the_lease(tmp_path):
    go, done = tmp_path / "go", tmp_path / "done"
    procs = [subprocess.Popen([sys.executable, "-c", RACER.format(repo=str(REPO_ROOT), go=str(go), done=str(done),
                                                                  out=str(tmp_path / f"r{i}"), lease=str(tmp_path / "lease"))])
             for i in range(5)]
    try:
        deadline = time.monotonic() + 120
        time.sleep(1.0)
        go.touch()
        while not all((tmp_path / f"r{i}").exists() for i in range(5)) and time.monotonic() < deadline:
            time.sleep(0.1)
        results = sorted((tmp_path / f"r{i}").read_text() for i in range(5))
        assert results == ["lost"] * 4 + ["won"]
    finally:
        done.touch()
        for p in procs:
            p.wait(timeout=60)


OVERLAP = """
import sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import test_schedule as t
from pathlib import Path
sys.exit(t.run_slot(Path({root!r}), {slot!r}))
"""


def test_two_overlapping_processes_train_once(env, monkeypatch):
    """Two scheduled runs started together (separate processes, slots of overlapping crons): one
    trains, the other finds the live lease and exits 0 without training."""
    monkeypatch.setenv("SCHED_SLOW", str(env / "training"))
    (env / "wd").mkdir()
    # the SQLite store exists before two processes open it
    client(env).create_experiment("sched", artifact_location=(env / "wd" / "mlartifacts").as_uri())
    procs = {slot: subprocess.Popen([sys.executable, "-c", OVERLAP.format(repo=str(REPO_ROOT), tests=str(REPO_ROOT / "tests"),
                                                                       root=str(env), slot=slot)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for slot in ("a", "b")}
    outs = {slot: p.communicate(timeout=300)[0] for slot, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outs
    assert len(trained(env)) == 1, outs
    winner = next(s for s, o in outs.items() if "done (MLflow run" in o)
    loser = "b" if winner == "a" else "a"
    assert "another run holds the lease" in outs[loser] and "not training" in outs[loser]


def test_dry_run_shows_the_slot_state(env):
    def dry(slot):
        return subprocess.run([sys.executable, "pipeline/run.py", "--dry-run", "--schedule-slot", slot,
                               *overrides(env)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

    out = dry("d1")
    assert out.returncode == 0, out.stderr
    assert "# schedule: slot d1: not done; lease: free; new train shards since the last success: 2" in out.stdout
    assert run_slot(env, "d1") == 0
    assert "# schedule: slot d1: done (trained, run " in dry("d1").stdout
    bad = dry("no good")
    assert bad.returncode == 2 and "--schedule-slot 'no good': expected 'auto'" in bad.stderr


def steal_lease(lease_dir: Path) -> None:
    """Another run's takeover of the lease (a higher number, live, on another host)."""
    n = max(int(p.stem) for p in lease_dir.glob("*.json"))
    (lease_dir / f"{n + 1:012d}.json").write_text(json.dumps(
        {"owner": "other", "pid": 1, "host": "elsewhere", "expires_at": time.time() + 600}))


@pytest.mark.parametrize("lands_in", ["warm_start", "_parent_run"])
def test_a_lease_lost_outside_the_stages_exits_4_without_recording_the_slot(env, monkeypatch, lands_in):
    """The renewal thread raises LeaseLost in the main thread wherever it is, not only inside a stage:
    here while the champion is looked up (before the stages) and right after run_stages returned (the
    parent run looked up to record the slot under). Either way exit 4, no slot record, no slot_done."""
    lease_dir = env / "wd" / "schedule" / "lease"
    real = getattr(schedule, lands_in)

    def steal_then_carry_on(*args, **kwargs):
        steal_lease(lease_dir)
        for _ in range(1200):  # the renewal thread notices within ttl/3 and interrupts us
            time.sleep(0.05)
        (env / "not-interrupted").touch()
        return real(*args, **kwargs)

    monkeypatch.setattr(schedule, lands_in, steal_then_carry_on)
    try:
        rc = run_slot(env, "d1", "schedule.lease_ttl_s=1.5")
    except KeyboardInterrupt as e:  # LeaseLost is one: pytest would stop the whole session on it
        pytest.fail(f"the lost lease escaped run_scheduled as {type(e).__name__} instead of exit "
                    f"{schedule.EXIT_LEASE_LOST}")
    assert rc == schedule.EXIT_LEASE_LOST
    assert not (env / "not-interrupted").exists()
    assert not (env / "wd" / "schedule" / "slots" / "d1.json").exists()
    assert not (env / "wd" / "schedule" / "last_success.json").exists()
    assert trained(env) == ([] if lands_in == "warm_start" else ["train-000.tar,train-001.tar"])
    exp = client(env).get_experiment_by_name("sched")
    assert exp is None or all("schedule.slot_done" not in r.data.tags for r in runs_of_slot(env, "d1"))
    assert schedule.Lease(lease_dir, 1.5).current()["owner"] == "other"  # the new holder's, untouched


def dead_loopback_url() -> str:
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_an_unreachable_registry_is_an_error_not_a_cold_start(env, monkeypatch, capsys):
    """The tracking store answers (so the start-up reachability check passes) but the model registry
    (MLFLOW_REGISTRY_URI) is a loopback port nothing listens on: the champion lookup is an error, exit
    5, one line naming the registry and the model@alias; nothing trains, nothing is recorded for the
    slot, the lease is released. Once the registry answers, the slot runs (no champion: cold start)."""
    registry = dead_loopback_url()
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries take minutes
    assert run_slot(env, "d1") == schedule.EXIT_REGISTRY_UNAVAILABLE
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: slot d1: the model registry {registry} cannot be reached to look up the "
                           f"champion swd-student@champion (")
    assert "nothing is recorded for the slot" in line and "schedule.warm_start=false" in line
    assert trained(env) == []
    assert not (env / "wd" / "schedule" / "slots" / "d1.json").exists()
    exp = client(env).get_experiment_by_name("sched")
    assert exp is None or runs_of_slot(env, "d1") == []
    assert schedule.Lease(env / "wd" / "schedule" / "lease", 60).current()["released"] is True

    # The same through the command line: exit 5 and that one line, no traceback.
    cli_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    cli = subprocess.run([sys.executable, "pipeline/run.py", "--schedule-slot", "d1", *overrides(env)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=cli_env)
    assert cli.returncode == schedule.EXIT_REGISTRY_UNAVAILABLE, cli.stdout + cli.stderr
    assert f"error: slot d1: the model registry {registry} cannot be reached" in cli.stderr
    assert "Traceback" not in cli.stderr and trained(env) == []

    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    assert run_slot(env, "d1") == 0
    (parent,) = [r for r in runs_of_slot(env, "d1") if r.data.tags.get("pipeline.kind") == "pipeline"]
    assert parent.data.tags["schedule.warm_start"] == "no champion yet: trained from the teacher"


def test_no_champion_on_a_registry_server_still_cold_starts(env, monkeypatch, mlflow_server):
    """A registry server that answers "no such registered model", then "no such alias" (a model
    without a champion yet): no champion, the student trains from the teacher."""
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
    name = f"sched-cold-{os.getpid()}-{time.time_ns()}"
    assert run_slot(env, "d1", f"register.model_name={name}") == 0
    mlflow.MlflowClient(mlflow_server).create_registered_model(name)
    assert run_slot(env, "d2", f"register.model_name={name}", "schedule.skip_without_new_shards=false") == 0
    for slot in ("d1", "d2"):
        (parent,) = [r for r in runs_of_slot(env, slot) if r.data.tags.get("pipeline.kind") == "pipeline"]
        assert parent.data.tags["schedule.warm_start"] == "no champion yet: trained from the teacher"
