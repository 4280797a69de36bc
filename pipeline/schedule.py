"""Scheduled retraining: `python pipeline/run.py --config PROFILE --schedule-slot auto|NAME`.

A cron (cluster/k8s/raycronjob.yaml, cluster/k8s/cronjob-submit.yaml) starts the same command every
period; this module makes that safe to repeat and to overlap. Steps of a scheduled run:
1. Slot: `auto` names the `schedule.slot_s`-wide window holding the current UTC time (a day by
   default: `2026-11-22`; shorter: `2026-11-22T0200Z`); any other name is used as given.
2. Done already? A slot is done when `workdir/schedule/slots/<slot>.json` exists, or when MLflow
   holds a run of the experiment tagged `schedule.slot=<slot>` and `schedule.slot_done=true` (a
   workdir that lost its records). Then the run prints so and exits 0: the same slot twice does
   nothing twice.
3. Lease (`Lease`): one file per holder under `workdir/schedule/lease/`, `<n>.json` holding owner
   id, pid, host, slot and `expires_at`, created exclusively (hard link of a complete temp file:
   exactly one of two racing runs gets number n). The highest number is the holder. A live holder
   renews it every `lease_ttl_s / 3` seconds; a run that finds a live holder exits 0 without
   training. A holder whose lease expired (crashed, hung, lost its node), or on this host a holder
   whose process is gone, is taken over by creating number n + 1. A holder that finds a higher number
   has lost its lease: the run is interrupted and exits 4 (EXIT_LEASE_LOST) without recording the
   slot, wherever the interruption lands (in a stage, in the champion lookup, after the stages). The
   slot is recorded only after the interruption is switched off and one more renewal found the lease
   still held. Cross-host expiry compares wall clocks: keep `lease_ttl_s` well above the nodes' clock skew.
4. Slot re-checked under the lease (a run that finished while this one waited).
5. New shards: the train shard list (url, size, mtime) against the one recorded by the last
   successful scheduled run (`workdir/schedule/last_success.json`). Only those shards are new work:
   the `shards` stage's fingerprint changes with the list and the `cache` stage encodes only shards
   whose per-shard key it has not committed. With `schedule.skip_without_new_shards` and none new,
   the slot is recorded as done (`outcome=no_new_shards`) without running the stages.
6. Warm start from the current champion (`register.model_name` @ `register.alias` in the MLflow
   registry) when `schedule.warm_start`: the champion's MLflow model is downloaded once into
   `workdir/schedule/champions/<name>-v<version>/` and handed to the distill stage through its config
   field `WARM_START_FIELD` (`distill.init_student`, which finds the LoRA adapter inside). A champion
   that cannot warm-start this config (no LoRA adapter, another LoRA rank / alpha / target modules,
   `swd.student.full_finetune`) is not used: the student trains from the teacher, and the run
   records why (tag `schedule.warm_start`). Only "no such registered model" and "no such alias" mean
   no champion; a registry that cannot be asked (refused, 5xx, timeout, permission denied, after
   MLflow's own retries) stops the run with exit 5 (EXIT_REGISTRY_UNAVAILABLE) and nothing recorded
   for the slot: a registry outage never silently retrains from the teacher.
7. The stage graph runs as usual (evaluate on the fixed eval set; register promotes only if better),
   under one MLflow parent run tagged `schedule.slot`, `schedule.new_shards`, `schedule.warm_start`.
   On success the slot record and `last_success.json` are written and the parent run is tagged
   `schedule.slot_done=true`. A failed run records nothing: the next run of the slot retries, and
   resumes from the committed stages and the distill checkpoints. The lease is released in every case.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from pipeline.config import Section

EXIT_LEASE_LOST = 4
EXIT_REGISTRY_UNAVAILABLE = 5
SLOT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The distill stage's config field that takes an initial student (a LoRA / transformer directory).
WARM_START_FIELD = "init_student"
SCHEDULE_DIR = "schedule"


class Config(Section):

    # Width of a slot in seconds; `--schedule-slot auto` names the slot holding the current UTC time.
    slot_s: int = Field(86400, ge=60)
    # Lifetime of the lease without renewal (renewed every third of it while the run lives).
    lease_ttl_s: float = Field(300.0, ge=1)
    # Record the slot as done without running when no train shard was added since the last success.
    skip_without_new_shards: bool = True
    # Start the student from the current champion (distill.init_student).
    warm_start: bool = True


class ScheduleError(ValueError):
    pass


class RegistryUnavailable(RuntimeError):
    """The model registry did not answer the champion lookup (not "no champion": that is None)."""


# ----------------------------------------------------------------------------- slots


def resolve_slot(arg: str, slot_s: int, now: float | None = None) -> str:
    """`auto` -> the name of the slot holding `now` (UTC); any other name is checked and kept."""
    if arg == "auto":
        start = int((time.time() if now is None else now) // slot_s * slot_s)
        t = datetime.fromtimestamp(start, timezone.utc)
        return t.strftime("%Y-%m-%d") if slot_s % 86400 == 0 else t.strftime("%Y-%m-%dT%H%M%SZ" if slot_s % 60 else "%Y-%m-%dT%H%MZ")
    if not SLOT_PATTERN.match(arg):
        raise ScheduleError(f"--schedule-slot {arg!r}: expected 'auto' or a name of letters, digits, '.', '_', '-' "
                            f"(at most 64, e.g. 2026-11-22)")
    return arg


def schedule_dir(workdir: Path) -> Path:
    return Path(workdir) / SCHEDULE_DIR


def slot_record_path(workdir: Path, slot: str) -> Path:
    return schedule_dir(workdir) / "slots" / f"{slot}.json"


def read_slot_record(workdir: Path, slot: str) -> dict | None:
    path = slot_record_path(workdir, slot)
    return json.loads(path.read_text()) if path.is_file() else None


def mlflow_slot_run(mlc, experiment: str, slot: str) -> str | None:
    """The id of a run in `experiment` that completed `slot`, if any."""
    exp = mlc.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mlc.search_runs([exp.experiment_id], max_results=1, filter_string=(
        f"tags.`schedule.slot` = '{slot}' and tags.`schedule.slot_done` = 'true'"))
    return runs[0].info.run_id if runs else None


def _write_json(path: Path, data: Any) -> None:
    """Atomic: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the lease


def _pid_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot), to tell a reused pid from the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _pid_start(pid) in (None, start)


class Lease:
    """An exclusive, expiring lease on a directory (see the module docstring, step 3)."""

    def __init__(self, directory: Path, ttl_s: float, slot: str = ""):
        self.directory = Path(directory)
        self.ttl_s = ttl_s
        self.slot = slot
        self.owner = uuid.uuid4().hex
        self.number: int | None = None
        self.holder: dict | None = None  # the live holder that refused us, for messages
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_lost: Callable[[], None] | None = None
        self._guard = threading.Lock()  # on_lost is called under it; disarm() takes it away under it

    # -- files
    def _files(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.directory.glob("*.json"):
            if p.stem.isdigit():
                out.append((int(p.stem), p))
        return sorted(out)

    def _path(self, n: int) -> Path:
        return self.directory / f"{n:012d}.json"

    def _record(self, **extra) -> dict:
        now = time.time()
        return {"owner": self.owner, "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                "host": socket.gethostname(), "slot": self.slot, "acquired_at": now, "renewed_at": now,
                "expires_at": now + self.ttl_s, "released": False, **extra}

    def _read(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # unreadable: it expires a ttl after its last write
            try:
                return {"owner": None, "expires_at": path.stat().st_mtime + self.ttl_s, "released": False}
            except OSError:
                return {"owner": None, "expires_at": 0, "released": True}

    def live(self, rec: dict, now: float | None = None) -> bool:
        """Held: not released, not expired, and (on this host) its process still exists."""
        if rec.get("released") or rec.get("expires_at", 0) <= (time.time() if now is None else now):
            return False
        if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
            return _alive(rec["pid"], rec.get("pid_start"))
        return True

    def current(self) -> dict | None:
        """The record of the highest-numbered lease file (the holder, live or not)."""
        files = self._files()
        return self._read(files[-1][1]) if files else None

    # -- acquire / renew / release
    def acquire(self) -> bool:
        """Take the lease unless a live holder has it; takes over an expired or dead holder's."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            files = self._files()
            nxt = 0
            if files:
                n, path = files[-1]
                rec = self._read(path)
                if self.live(rec):
                    self.holder = rec
                    return False
                nxt = n + 1
            tmp = self.directory / f".{self.owner}.tmp"
            tmp.write_text(json.dumps(self._record(taken_over=files[-1][1].name if files else None)))
            try:
                os.link(tmp, self._path(nxt))  # exclusive: fails if another run took nxt first
            except FileExistsError:
                continue
            finally:
                tmp.unlink(missing_ok=True)
            self.number = nxt
            for n, path in files:  # older holders' files; the highest number is all that counts
                path.unlink(missing_ok=True)
            return True
        self.holder = self.current()
        return False

    def renew(self) -> bool:
        """Push the expiry out; False (and `lost`) when another run has taken the lease over."""
        if self.number is None or self.lost:
            return False
        files = self._files()
        mine = self._path(self.number)
        rec = self._read(mine) if mine.exists() else {}
        if not files or files[-1][0] != self.number or rec.get("owner") != self.owner:
            self.lost = True
            return False
        now = time.time()
        rec.update(renewed_at=now, expires_at=now + self.ttl_s)
        _write_json(mine, rec)
        return True

    def release(self) -> None:
        self.disarm()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.number is None or self.lost:
            return
        files = self._files()
        mine = self._path(self.number)
        if files and files[-1][0] == self.number:
            rec = self._read(mine)
            if rec.get("owner") == self.owner:
                rec.update(released=True, expires_at=time.time())
                _write_json(mine, rec)
        self.number = None

    def keep_renewed(self, on_lost: Callable[[], None]) -> None:
        """Renew every ttl/3 in a daemon thread; call `on_lost` once if the lease is taken over (unless
        disarmed by then)."""
        self._on_lost = on_lost

        def loop():
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    ok = self.renew()
                except OSError as e:  # shared storage hiccup: try again next period, the ttl covers it
                    print(f"[schedule] lease renewal failed ({e}); retrying", flush=True)
                    continue
                if not ok:
                    print(f"[schedule] lease lost: another run took over {self.directory}", flush=True)
                    with self._guard:
                        if self._on_lost is not None:
                            self._on_lost()
                    return

        self._thread = threading.Thread(target=loop, name="schedule-lease", daemon=True)
        self._thread.start()

    def disarm(self) -> None:
        """No `on_lost` from now on (renewal goes on; a takeover only sets `lost`). When this returns,
        `on_lost` either ran already (and `lost` is True) or never will."""
        with self._guard:
            self._on_lost = None


class LeaseLost(KeyboardInterrupt):
    """Raised in the main thread when another run has taken the lease over (a KeyboardInterrupt, so
    the stage runner marks the run KILLED and commits nothing)."""


def interrupt_main_thread() -> None:
    """Raise LeaseLost in the main thread at its next Python instruction. Not `_thread.interrupt_main`:
    that calls whatever SIGINT handler is installed, and once a library has replaced Python's default
    handler it raises nothing (seen in the full test suite: the run slept on to its end)."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.main_thread().ident),
                                               ctypes.py_object(LeaseLost))


def describe_holder(rec: dict | None) -> str:
    if not rec:
        return "nobody"
    left = rec.get("expires_at", 0) - time.time()
    return (f"pid {rec.get('pid')} on {rec.get('host')} (slot {rec.get('slot')!r}, lease expires in "
            f"{max(left, 0):.0f} s unless renewed)")


# ----------------------------------------------------------------------------- new shards, champion


def shard_list(spec: str | list[str] | None) -> list[dict] | None:
    """The train shards the config names now (None: generated data, listed by the shards stage)."""
    if spec is None:
        return None
    from pipeline.data import expand_shards

    return expand_shards(spec, "data.train_shards")


def new_shards(current: list[dict] | None, last: list[dict] | None) -> list[dict] | None:
    """Shards not in the last successful run's list; a shard rewritten since (size or mtime) counts."""
    if current is None:
        return None
    seen = {(s["url"], s["size_bytes"], s["mtime_ns"]) for s in (last or [])}
    return [s for s in current if (s["url"], s["size_bytes"], s["mtime_ns"]) not in seen]


def read_last_success(workdir: Path) -> dict | None:
    path = schedule_dir(workdir) / "last_success.json"
    return json.loads(path.read_text()) if path.is_file() else None


def champion(mlc, cfg) -> dict | None:
    """The registered model version holding the champion alias, or None when the registry says there is
    none (no such registered model, no such alias). Any other failure is RegistryUnavailable. The alias
    is read from the registered model (MLflow reports a missing alias as INVALID_PARAMETER_VALUE, the
    same code as a malformed request, so that error cannot tell "no champion" apart)."""
    from mlflow.exceptions import MlflowException

    name = getattr(cfg.register, "model_name", None)
    alias = getattr(cfg.register, "alias", "champion")
    if not name:
        return None

    def ask(call):
        try:
            return call()
        except (MlflowException, OSError) as e:
            if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return None
            registry = getattr(mlc, "_registry_uri", None) or "(the tracking URI)"
            reason = " ".join(str(e).split())
            raise RegistryUnavailable(
                f"the model registry {registry} cannot be reached to look up the champion {name}@{alias} "
                f"({reason[:400]}{'...' if len(reason) > 400 else ''})") from None

    model = ask(lambda: mlc.get_registered_model(name))
    version = None if model is None else (model.aliases or {}).get(alias)
    mv = None if version is None else ask(lambda: mlc.get_model_version(name, str(version)))
    if mv is None:
        return None
    return {"name": name, "alias": alias, "version": str(mv.version), "run_id": mv.run_id, "source": mv.source}


def warm_start(cfg, mlc, uri: str, enabled: bool) -> tuple[Any, str]:
    """(config, what happened): the config with the champion as the distill stage's initial student
    when it fits this config's student LoRA."""
    if not enabled:
        return cfg, "off"
    champ = champion(mlc, cfg)
    if champ is None:
        return cfg, "no champion yet: trained from the teacher"
    where = f"champion {champ['name']} v{champ['version']}"
    import mlflow.artifacts

    from pipeline.student_export import init_student_problems, model_dir

    local = schedule_dir(cfg.workdir) / "champions" / f"{champ['name']}-v{champ['version']}"
    if not local.is_dir():
        tmp = local.with_name(local.name + f".{uuid.uuid4().hex[:6]}.tmp")
        mlflow.artifacts.download_artifacts(artifact_uri=champ["source"], dst_path=str(tmp),
                                            tracking_uri=uri)
        os.replace(tmp, local)
    model = model_dir(local)
    problems = init_student_problems(str(model), cfg.swd.student)
    if problems:
        return cfg, f"{where} not used: {' '.join(problems)}; the student was trained from the teacher"
    distill = cfg.distill.model_copy(update={WARM_START_FIELD: str(model)})
    return cfg.model_copy(update={"distill": distill}), f"{where} ({model})"


# ----------------------------------------------------------------------------- the scheduled run


def describe(cfg, slot: str) -> str:
    """For --dry-run: the slot's state from the workdir's records (MLflow is not asked)."""
    rec = read_slot_record(cfg.workdir, slot)
    last = read_last_success(cfg.workdir)
    lease = Lease(schedule_dir(cfg.workdir) / "lease", cfg.schedule.lease_ttl_s, slot)
    holder = lease.current()
    try:
        fresh = new_shards(shard_list(cfg.data.train_shards), last and last.get("train_shards"))
    except ValueError as e:
        fresh = str(e)
    return (f"# schedule: slot {slot}: "
            + (f"done ({rec.get('outcome')}, run {rec.get('run_id')})" if rec else "not done")
            + f"; lease: {describe_holder(holder) if holder and lease.live(holder) else 'free'}"
            + f"; new train shards since the last success: "
            + ("generated data" if fresh is None else fresh if isinstance(fresh, str) else str(len(fresh))))


def run_scheduled(cfg, slot: str, uri: str, argv: list[str], *, plan: Callable, init_ray: Callable,
                  run_stages: Callable) -> int:
    """Steps 2-7 of the module docstring for a resolved `slot`. `plan(cfg)`, `init_ray(cfg)` and
    `run_stages(cfg, planned, uri, argv, tags=...)` are pipeline/run.py's."""
    from pipeline import tracking

    mlc = tracking.client(uri)

    def done() -> str | None:
        rec = read_slot_record(cfg.workdir, slot)
        if rec is not None:
            return f"{rec.get('outcome')} by run {rec.get('run_id')} at {rec.get('finished_at')}"
        run_id = mlflow_slot_run(mlc, cfg.tracking.experiment, slot)
        return f"by MLflow run {run_id}" if run_id else None

    lease = Lease(schedule_dir(cfg.workdir) / "lease", cfg.schedule.lease_ttl_s, slot)
    if (how := done()) is not None:
        print(f"[schedule] slot {slot} already done ({how}); nothing to do", flush=True)
        return 0
    if not lease.acquire():
        print(f"[schedule] slot {slot}: another run holds the lease on {cfg.workdir}: "
              f"{describe_holder(lease.holder)}; not training", flush=True)
        return 0
    # From here the renewal thread may raise LeaseLost in this thread at any instruction. It is caught
    # here, around everything up to the release, which disarms the thread: an interruption it already
    # raised lands inside release() at the latest (the next Python call), so none escapes this function.
    rc = EXIT_LEASE_LOST
    try:
        try:
            lease.keep_renewed(on_lost=interrupt_main_thread)
            rc = _run_holding_lease(cfg, slot, uri, argv, mlc, lease, done, plan, init_ray, run_stages)
        finally:
            lease.release()
    except KeyboardInterrupt:
        if not lease.lost:  # a real Ctrl-C
            raise
        rc = EXIT_LEASE_LOST
    if rc == EXIT_LEASE_LOST:
        print(f"error: slot {slot}: the lease on {cfg.workdir} was taken over by another run; stopped without "
              f"recording the slot (a later run of it retries)", flush=True)
    return rc


def _run_holding_lease(cfg, slot: str, uri: str, argv: list[str], mlc, lease: Lease, done: Callable,
                       plan: Callable, init_ray: Callable, run_stages: Callable) -> int:
    """Steps 4-7, under the lease. Returns EXIT_LEASE_LOST (the caller says why) when the lease is found
    lost; anything is recorded only after `lease.disarm()` and a renewal that found the lease held."""
    sc: Config = cfg.schedule

    def still_held() -> bool:  # after this no LeaseLost arrives, and the lease is ours for another ttl
        lease.disarm()
        return not lease.lost and lease.renew()

    if (how := done()) is not None:
        print(f"[schedule] slot {slot} already done ({how}); nothing to do", flush=True)
        return 0
    last = read_last_success(cfg.workdir)
    current = shard_list(cfg.data.train_shards)
    fresh = new_shards(current, last and last.get("train_shards"))
    tags = {"schedule.slot": slot, "schedule.attempt": uuid.uuid4().hex,
            "schedule.new_shards": "generated" if fresh is None else str(len(fresh)),
            "schedule.last_success_slot": (last or {}).get("slot") or ""}
    if fresh is not None:
        print(f"[schedule] slot {slot}: {len(fresh)} new train shard(s) of {len(current)} since "
              f"{'the last successful run (slot ' + last['slot'] + ')' if last else 'ever'}", flush=True)
    if fresh == [] and last is not None and sc.skip_without_new_shards:
        if not still_held():
            return EXIT_LEASE_LOST
        run_id = _record_skip(mlc, cfg, tags, uri)
        _record_slot(cfg.workdir, slot, "no_new_shards", run_id, fresh, current)
        print(f"[schedule] slot {slot}: no new train shards since slot {last['slot']}; recorded as done "
              f"without training (MLflow run {run_id})", flush=True)
        return 0
    try:
        cfg, how_warm = warm_start(cfg, mlc, uri, sc.warm_start)
    except RegistryUnavailable as e:
        print(f"error: slot {slot}: {e}; nothing is recorded for the slot (the next run retries it): bring the "
              f"registry back or point MLFLOW_REGISTRY_URI / tracking.uri at a reachable one, or run with "
              f"schedule.warm_start=false to train from the teacher", file=sys.stderr, flush=True)
        return EXIT_REGISTRY_UNAVAILABLE
    tags["schedule.warm_start"] = how_warm
    print(f"[schedule] slot {slot}: warm start: {how_warm}", flush=True)
    if fresh:
        _log_new_shards(tags, fresh)
    planned = plan(cfg)
    if any(p.action == "run" for p in planned):
        init_ray(cfg)
    rc = run_stages(cfg, planned, uri, argv, tags=tags)
    if lease.lost:  # a stage (or a library) swallowed the interruption
        return EXIT_LEASE_LOST
    if rc != 0:
        return rc
    run_id = _parent_run(mlc, cfg.tracking.experiment, tags["schedule.attempt"])
    if not still_held():
        return EXIT_LEASE_LOST
    if run_id:
        mlc.set_tag(run_id, "schedule.slot_done", "true")
    _record_slot(cfg.workdir, slot, "trained", run_id, fresh, current)
    _write_json(schedule_dir(cfg.workdir) / "last_success.json",
                {"slot": slot, "run_id": run_id, "finished_at": _now(), "train_shards": current})
    print(f"[schedule] slot {slot} done (MLflow run {run_id})", flush=True)
    return 0


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _log_new_shards(tags: dict, fresh: list[dict]) -> None:
    names = ",".join(Path(s["url"]).name for s in fresh)
    tags["schedule.new_shard_names"] = names if len(names) <= 4000 else names[:3990] + ",..."


def _record_slot(workdir: Path, slot: str, outcome: str, run_id: str | None, fresh, current) -> None:
    _write_json(slot_record_path(workdir, slot), {
        "slot": slot, "outcome": outcome, "run_id": run_id, "finished_at": _now(),
        "new_shards": None if fresh is None else [s["url"] for s in fresh],
        "train_shards": None if current is None else len(current)})


def _record_skip(mlc, cfg, tags: dict, uri: str) -> str:
    """A finished MLflow run that says the slot was looked at and had nothing new to train on."""
    from pipeline import tracking

    exp_id = tracking.ensure_experiment(mlc, cfg.tracking.experiment, tracking.artifact_location(cfg, uri))
    run = mlc.create_run(exp_id, tags={**tags, "mlflow.runName": f"schedule-{tags['schedule.slot']}",
                                       "pipeline.kind": "schedule", "schedule.outcome": "no_new_shards",
                                       "schedule.slot_done": "true"})
    mlc.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _parent_run(mlc, experiment: str, attempt: str) -> str | None:
    exp = mlc.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mlc.search_runs([exp.experiment_id], max_results=1,
                           filter_string=f"tags.`schedule.attempt` = '{attempt}'")
    return runs[0].info.run_id if runs else None
