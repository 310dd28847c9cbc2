"""Sweeps: configs' seeds times a grid of values, one run per Ray task (one by one without Ray).

A sweep is a list of ordinary runs, each in its usual run directory (the grid point goes into the
run's ``prefix``, so no two runs share a directory). Its state is the state of those directories:
a complete results.json is a finished run (skipped), a checkpoint an unfinished one (resumed); the
sweep's own record, ``<log_dir>/sweeps/<name>/sweep.json``, keeps each run's status, timings and,
for failed runs, the error (retried only with ``retry_failed``). Runs on Ray workers of this host die
with the driver: a killed sweep leaves no run executing, and its re-run resumes them. Every run of a sweep shares one
on-disk feature cache, so frozen features are encoded once for all seeds and grid points.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pilot.checkpoints import CheckpointStore
from pilot.config import load_raw
from pilot.configure import build_config
from pilot.engine import run_directory
from pilot.errors import PilotError
from pilot.outputs import write_json
from pilot.results import is_complete
from pilot.runlock import alive_here, owned_by, wait_for_orphan


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its config, grid point, seed, the overrides that make it, and its directory."""

    config_path: Path
    point: dict[str, Any]
    seed: int
    overrides: dict[str, Any]
    run_dir: Path

    @property
    def label(self) -> str:
        point = ", ".join(f"{k}={v}" for k, v in self.point.items())
        return f"{self.overrides['model_name']} seed {self.seed}" + (f" [{point}]" if point else "")

    def state(self) -> str:
        """'complete', 'unfinished' (a checkpoint to resume from) or 'new'."""
        if is_complete(self.run_dir):
            return "complete"
        return "unfinished" if CheckpointStore(self.run_dir).exists() else "new"


@dataclass
class Sweep:
    config_paths: list[Path]
    runs: list[SweepRun]
    directory: Path  # the sweep's record and the shared feature cache live here
    devices: list[str] = field(default_factory=list)  # the runs' ``device`` (PILOT's GPU ids, or "cpu")
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    records: dict[str, dict] = field(default_factory=dict)  # run_dir -> status, error, timings

    @property
    def record_path(self) -> Path:
        return self.directory / "sweep.json"

    def uses_cuda(self) -> bool:
        """Whether the runs ask for a GPU and this machine has one (the default of one GPU per run)."""
        import torch

        return torch.cuda.is_available() and any(str(d) not in ("cpu", "-1") for d in self.devices)


def point_prefix(prefix: str, point: dict[str, Any]) -> str:
    """The run's prefix: the config's, then each grid value (``init_lr=0.01``), so directories never collide."""
    text = lambda value: value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    parts = [prefix.strip()] + [f"{key}={text(value)}".replace("/", "-") for key, value in point.items()]
    return "-".join(part for part in parts if part)


def expand(config_paths: list[str | Path], grid: dict[str, list[Any]], sets: dict[str, Any],
           name: Optional[str] = None) -> Sweep:
    """The cross product of each config's seeds and the grid, every run's config validated before any runs."""
    config_paths = [Path(path).resolve() for path in config_paths]
    raws = [load_raw(path) for path in config_paths]
    base = build_config(raws[0], sets).experiment
    directory = Path(base.log_dir) / "sweeps" / (name or sweep_name(config_paths, grid, sets))
    cache = sets.get("feature_cache_dir") or raws[0].get("feature_cache_dir") or str(directory / "feature_cache")
    runs, seen = [], {}
    for path, raw in zip(config_paths, raws):
        prefix = build_config(raw, sets).experiment.prefix
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            for seed in build_config(raw, {**sets, **point}).experiment.seed:
                overrides = {**sets, **point, "seed": [seed], "prefix": point_prefix(prefix, point),
                             "feature_cache_dir": cache}
                experiment = build_config(raw, overrides).experiment
                overrides["model_name"] = experiment.model_name
                run = SweepRun(path, point, seed, overrides, run_directory(experiment, seed).resolve())
                if run.run_dir in seen:
                    raise PilotError(f"Runs '{seen[run.run_dir].label}' and '{run.label}' would share the directory "
                                     f"'{run.run_dir}'; give the grid distinct values, or the configs distinct "
                                     f"prefixes.")
                seen[run.run_dir] = run
                runs.append(run)
    return Sweep(config_paths, runs, directory, list(base.device))


def sweep_name(config_paths: list[Path], grid: dict, sets: dict) -> str:
    """Same command, same name: re-running a sweep finds its record again."""
    digest = hashlib.sha256(json.dumps([[str(p) for p in config_paths], grid, sets], sort_keys=True,
                                       default=str).encode()).hexdigest()[:8]
    return f"{'+'.join(path.stem for path in config_paths)}-{digest}"


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``key=v1,v2`` (each value JSON when it parses as JSON) into ``{key: [v1, v2]}``."""
    grid = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[1]:
            raise PilotError(f"--grid expects key=v1,v2,..., got '{item}'.")
        key, values = item.split("=", 1)
        grid[key.strip()] = [_json_or_text(value) for value in _split_values(values)]
    return grid


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets, so list values (``milestones=[10,20],[30]``) stay whole."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return values + [current]


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# --- running ---------------------------------------------------------------------------------------


def run_one(config_path: str, overrides: dict[str, Any], resume: bool, cwd: str, threads: int,
            driver: dict) -> dict[str, Any]:
    """One run in this process (a Ray worker or the driver), started as ``pilot`` starts one (its run
    directory checked first): the record that sweep.json keeps."""
    import torch

    from pilot.engine import run_experiment

    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths in the config mean what they mean on the driver (local clusters)
    torch.set_num_threads(max(1, threads))
    started = time.time()
    try:
        with owned_by(driver), dies_with(driver):
            (result,) = run_experiment(build_config(load_raw(config_path), overrides), resume=resume)
    except Exception as err:  # a failed run is recorded, the sweep goes on
        return {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
                "started": started, "finished": time.time(), "host": os.uname().nodename, "pid": os.getpid()}
    return {"status": "complete", "average_incremental_accuracy": result["average_incremental_accuracy"],
            "last_accuracy": result["last_accuracy"], "encoded_images": result["timings"]["encoded_images"],
            "started": started, "finished": time.time(), "host": os.uname().nodename, "pid": os.getpid()}


@contextlib.contextmanager
def dies_with(driver: dict, poll_seconds: float = 0.1):
    """In a worker on the driver's host, kill this process as soon as the driver is gone: Ray stops a dead
    driver's tasks only after a delay, while they would go on holding their run's lock. What the run had
    finished is in its checkpoint; the sweep's re-run resumes from it."""
    if driver["host"] != socket.gethostname() or driver["pid"] == os.getpid():
        yield  # another host (Ray's own cleanup applies), or the run is in the driver itself
        return
    finished = threading.Event()

    def watch():
        while not finished.wait(poll_seconds):
            if not alive_here(driver):
                os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="pilot-sweep-driver-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join()


def load_records(sweep: Sweep) -> dict[str, dict]:
    if sweep.record_path.is_file():
        return json.loads(sweep.record_path.read_text()).get("runs", {})
    return {}


def write_record(sweep: Sweep) -> None:
    sweep.directory.mkdir(parents=True, exist_ok=True)
    write_json(sweep.record_path, {"configs": [str(path) for path in sweep.config_paths],
                                   "run_dirs": [str(run.run_dir.resolve()) for run in sweep.runs],
                                   "runs": sweep.records})


def plan(sweep: Sweep, retry_failed: bool) -> list[tuple[SweepRun, bool]]:
    """The runs to start, each with whether it resumes; finished runs, and failed ones unless retried, are left out."""
    todo = []
    for run in sweep.runs:
        state = run.state()
        failed = sweep.records.get(str(run.run_dir), {}).get("status") == "failed"
        if state == "complete" or (failed and not retry_failed):
            continue
        todo.append((run, state == "unfinished"))
    return todo


def execute(sweep: Sweep, max_parallel: Optional[int] = None, address: Optional[str] = None,
            retry_failed: bool = False, use_ray: bool = True,
            report: Callable[[str], None] = print) -> dict[str, dict]:
    """Run what the sweep still needs, in parallel on Ray when it is installed; returns the records."""
    sweep.records = load_records(sweep)
    todo = plan(sweep, retry_failed)
    skipped = len(sweep.runs) - len(todo)
    report(f"sweep {sweep.directory.name}: {len(sweep.runs)} runs, {skipped} finished or failed before, "
           f"{len(todo)} to run ({sum(resume for _, resume in todo)} resuming)")
    write_record(sweep)
    if not todo:
        return sweep.records
    ray = _ray() if use_ray else None
    if ray is None and use_ray:
        report("pilot sweep: Ray is not installed, so the runs go one by one; for parallel runs: "
               "pip install -e \".[ray]\"")
    launch = _ray_launcher(ray, sweep, max_parallel, address) if ray else _serial_launcher(sweep)
    progress = _Progress(len(todo), report)
    for run, record in launch(todo):
        sweep.records[str(run.run_dir)] = {"label": run.label, "seed": run.seed, "point": run.point, **record}
        write_record(sweep)
        progress.done(run, record)
    return sweep.records


def _ray():
    try:
        import ray
    except ImportError:
        return None
    return ray


def _args(sweep: Sweep, run: SweepRun, resume: bool) -> tuple:
    wait_for_orphan(run.run_dir)  # a run of a killed earlier sweep of this one may still be stopping
    driver = {"host": socket.gethostname(), "pid": os.getpid()}
    return (str(run.config_path), run.overrides, resume, os.getcwd(), max(1, int(sweep.cpus_per_run)), driver)


def _serial_launcher(sweep: Sweep):
    def launch(todo):
        for run, resume in todo:
            yield run, run_one(*_args(sweep, run, resume))
    return launch


def _ray_launcher(ray, sweep: Sweep, max_parallel: Optional[int], address: Optional[str]):
    def launch(todo):
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=sweep.cpus_per_run, num_gpus=sweep.gpus_per_run, max_retries=0)(run_one)
        limit = max_parallel or len(todo)
        queue, pending = list(todo), {}
        while queue or pending:
            while queue and len(pending) < limit:
                run, resume = queue.pop(0)
                pending[remote.remote(*_args(sweep, run, resume))] = run
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ready)
            try:
                record = ray.get(ready)
            except Exception as err:  # the worker died (killed, out of memory): record it like a failed run
                record = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            yield run, record
    return launch


class _Progress:
    """A line per finished run with an overall count and bar."""

    def __init__(self, total: int, report: Callable[[str], None]) -> None:
        self.total, self.finished, self.report, self.started = total, 0, report, time.time()

    def done(self, run: SweepRun, record: dict) -> None:
        self.finished += 1
        bar = "#" * round(20 * self.finished / self.total)
        if record["status"] == "complete":
            outcome = (f"Ā {record['average_incremental_accuracy']:.2f}, last {record['last_accuracy']:.2f}, "
                       f"{record['finished'] - record['started']:.0f}s")
        else:
            outcome = f"FAILED: {record['error']}"
        self.report(f"[{bar:<20}] {self.finished}/{self.total} {run.label}: {outcome} "
                    f"({time.time() - self.started:.0f}s elapsed)")
