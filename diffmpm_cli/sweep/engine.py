"""Running a sweep on Ray Tune: the sweep folder, Ray's start (local or a running cluster), the Tuner, the live
records, the files at the end.

Ray's own files: a local Ray keeps its session (logs, sockets, spilled objects) under Ray's temporary folder
(``/tmp/ray`` unless ``RAY_TMPDIR`` says otherwise); Tune's experiment state goes to a temporary folder that is
removed at the end. Nothing of Ray's is written into the sweep's folder. Ray starts without its dashboard, with
usage statistics off and its workers' output kept in its logs, not on the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import dump_scene
from ..errors import ConfigError, DiffMPMError
from ..optimize.runfolder import Interrupted, first_existing, lock_folder, writable, write_error
from ..outputs.files import write_text
from .report import (
    best_record,
    make_record,
    plot_metric,
    read_jsonl,
    sort_records,
    write_csv,
    write_jsonl,
)
from .spec import SweepSpec
from .trials import SCENE_KEY, Trial, check_metric, expand, inspect_folders, read_summary
from .worker import numeric, run_trial

INSTALL = 'pip install "diffmpm[sweep]"'
# set before Ray is imported: no usage statistics (no network), no Tune result files, Tune's console output off,
# Ctrl-C reaches the sweep (which writes its records and exits 130) instead of Tune's own handler
RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
                   "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "TUNE_DISABLE_SIGINT_HANDLER": "1",
                   "RAY_AIR_NEW_OUTPUT": "0", "RAY_DEDUP_LOGS": "0"}


class SweepFailed(DiffMPMError):
    """No trial finished, or some ended in an error or unfinished. Exit code 1."""

    exit_code = 1


def require_ray() -> None:
    """ConfigError (exit 2) saying how to install Ray when it is missing."""
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError:
        raise ConfigError("diffmpm sweep", f"needs Ray Tune, which is not installed here: {INSTALL}") from None


@dataclass
class SweepResult:
    records: list[dict]  # sorted by the metric (report.py)
    best: dict | None
    metric: str
    mode: str
    out: Path
    ran: int  # trials run or resumed in this session
    skipped: int  # trials finished (or failed, stopped) in an earlier session
    files: list[Path]

    @property
    def exit_code(self) -> int:
        """0 when a trial finished and none ended in an error or unfinished; 1 otherwise."""
        bad = any(r["status"] in ("error", "unfinished") for r in self.records)
        return 1 if bad or self.best is None else 0


class SweepFolder:
    """The sweep's output folder: new, empty or holding a sweep (sweep.yaml); locked (flock on the folder, dropped
    when the process dies) while the sweep runs, so a second sweep into it is refused with exit 2."""

    def __init__(self, path: Path, option: str):
        self.path, self.option, self._fd = Path(path), option, None

    def check(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(self.option, f"{path} is not a folder")
        if path.is_dir() and not (path / "sweep.yaml").is_file() and any(path.iterdir()):
            raise ConfigError(self.option, f"{path} is not empty and holds no diffmpm sweep: choose a new or empty "
                                           "folder (or rerun a sweep into its own folder)")
        parent = first_existing(path)
        if not parent.is_dir():
            raise ConfigError(self.option, f"{parent} is not a folder")
        if not writable(parent):
            raise ConfigError(self.option, f"cannot write in {parent}: permission denied")

    def acquire(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, what=str(self.path)) from exc
        self._fd = lock_folder(self.path, option=self.option, holder="another diffmpm sweep")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def prepare(*, spec: SweepSpec, scenes: list[Path], out: Path, option: str = "--out") -> tuple[list[Trial], str, str]:
    """(trials with their states, metric, mode), reading only: every check that can refuse the sweep (exit 2)
    runs here, before anything is written or Ray starts."""
    folder = SweepFolder(out, option)
    folder.check()
    trials = expand(spec, scenes=scenes, out=out)
    metric, mode = check_metric(spec, trials)
    stopped = {r["trial"] for r in read_jsonl(Path(out) / "sweep.jsonl") if r.get("status") == "stopped"}
    inspect_folders(trials, stopped=stopped)
    return trials, metric, mode


def run_sweep(*, spec: SweepSpec, scenes: list[Path], out: Path, address: str | None = None,
              option: str = "--out", log: Callable[[str], None] | None = None) -> SweepResult:
    """Run (or resume) the sweep ``spec`` over ``scenes`` (resolved scene files) into ``out``.

    Trials finished (or failed, or stopped early) in an earlier session are skipped; unfinished ones resume from
    their checkpoints; the rest start. ``address``: a running Ray cluster ("auto", "ray://host:port"); None starts a
    local Ray with every core (and GPU) of this machine. ``log(text)`` hears the live events (a trial finished,
    failed, was retried). Returns the sorted records; writes sweep.yaml, sweep.jsonl, sweep.csv and sweep.png into
    ``out``. Bad input is ConfigError (exit 2) before anything is written."""
    log = log or (lambda text: None)
    require_ray()
    out = Path(out)
    trials, metric, mode = prepare(spec=spec, scenes=scenes, out=out, option=option)
    keys = ([SCENE_KEY] if len(scenes) > 1 else []) + list(spec.params)
    log_keys = {k for k, d in spec.params.items() if d.kind == "loguniform"}
    records: dict[str, dict] = {}
    todo = [t for t in trials if t.state in ("new", "unfinished")]
    files: list[Path] = []

    def save() -> list[Path]:
        ordered = sort_records([records[t.name] for t in trials if t.name in records], mode=mode)
        try:
            written = [write_jsonl(out / "sweep.jsonl", ordered), write_csv(out / "sweep.csv", ordered, keys=keys)]
        except OSError as exc:
            raise write_error(exc, what=str(out)) from exc
        return written

    for trial in trials:  # read before sweep.jsonl is rewritten (a stopped trial's record lives there)
        if trial.state not in ("new", "unfinished"):
            records[trial.name] = _earlier_record(trial, metric=metric, out=out)
    for trial in todo:  # what the table shows until the trial reports
        records[trial.name] = make_record(trial, metric=metric, status="unfinished", metrics={},
                                          session="resumed" if trial.state == "unfinished" else "ran")
    # Ray first (a cluster that cannot be reached, or too small for one trial, is refused before anything is
    # written); nothing to run: no Ray at all
    with _cluster(spec, address) if todo else contextlib.nullcontext() as placement:
        folder = SweepFolder(out, option)
        folder.acquire()
        try:
            try:
                write_text(out / "sweep.yaml", _spec_text(spec, scenes))
            except OSError as exc:
                raise write_error(exc, what=str(out / "sweep.yaml")) from exc
            save()
            if todo:
                try:
                    _fit(placement, spec=spec, trials=todo, metric=metric, mode=mode, records=records, save=save,
                         log=log)
                except KeyboardInterrupt:
                    raise Interrupted(f"interrupted (Ctrl-C): the trials keep their checkpoints; the same command "
                                      f"resumes the sweep in {out}") from None
        finally:
            try:
                files = save()
                ordered = sort_records([records[t.name] for t in trials if t.name in records], mode=mode)
                files.append(plot_metric(out / "sweep.png", ordered, keys=keys, metric=metric, log_keys=log_keys))
            finally:
                folder.release()
    ordered = sort_records([records[t.name] for t in trials], mode=mode)
    return SweepResult(records=ordered, best=best_record(ordered), metric=metric, mode=mode, out=out,
                       ran=len(todo), skipped=len(trials) - len(todo), files=[out / "sweep.yaml", *files])


def _spec_text(spec: SweepSpec, scenes: list[Path]) -> str:
    """sweep.yaml: the sweep as run (scenes resolved to absolute paths), for the record."""
    import yaml

    data = spec.model_dump(mode="json", exclude_none=True)
    data["scene"] = [str(Path(s).resolve()) for s in scenes]
    data["params"] = {k: {d.kind: d.args} for k, d in spec.params.items()}
    return yaml.safe_dump(data, sort_keys=False)


def _earlier_record(trial: Trial, *, metric: str, out: Path) -> dict:
    """The record of a trial this session does not run: refused parameters, or a run an earlier session ended."""
    if trial.scene is None:
        return make_record(trial, metric=metric, status="failed", metrics={}, error=trial.error, session="refused")
    summary = read_summary(trial.run_dir) or {}
    if trial.state == "stopped":
        earlier = next((r for r in read_jsonl(out / "sweep.jsonl") if r["trial"] == trial.name), {})
        return make_record(trial, metric=metric, status="stopped", metrics=earlier.get("metrics") or {},
                           iterations=earlier.get("iterations"), retries=earlier.get("retries") or 0,
                           session="skipped", wall_s=earlier.get("wall_s"))
    return make_record(trial, metric=metric, status=trial.state, metrics=numeric(summary.get("final") or {}),
                       error=trial.error, iterations=summary.get("iterations"), session="skipped",
                       wall_s=summary.get("wall_s"))


@contextlib.contextmanager
def _ray(address: str | None):
    """Ray, started quietly (or joined at ``address``) and shut down afterwards when this call started it."""
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():  # a caller's Ray (a notebook, a test): use it, leave it running
        yield ray
        return
    options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's note on CUDA_VISIBLE_DEVICES for CPU-only tasks
        try:
            if address is None:
                ray.init(**options)  # Ray counts the cores (and GPUs) this process may use (cgroups, affinity)
            else:
                options.pop("include_dashboard")
                ray.init(address=address, **options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError("--address", f"cannot reach a Ray cluster at {address!r}: {first}") from None
    try:
        # Ray's driver prints its workers' deaths ("(raylet) A worker died ...") on sys.stdout: while it runs, that
        # is stderr, so stdout carries only the command's result (the table, or --json)
        with contextlib.redirect_stdout(sys.stderr):
            yield ray
    finally:
        ray.shutdown()


@dataclass
class Placement:
    """Where trials run: each reserves ``cpus`` and ``gpus`` of the cluster and runs on ``device``."""

    cpus: float
    gpus: float
    device: str


@contextlib.contextmanager
def _cluster(spec: SweepSpec, address: str | None):
    """Ray (started or joined) and the resources of one trial, checked against the cluster (ConfigError)."""
    with _ray(address) as ray:
        cluster = ray.cluster_resources()
        gpus = spec.resources.gpus
        gpus = (1.0 if cluster.get("GPU", 0) >= 1 else 0.0) if gpus is None else float(gpus)
        cpus = spec.resources.cpus
        if cpus > cluster.get("CPU", 0):
            raise ConfigError("resources.cpus", f"{cpus:g} per trial, but the Ray cluster has {cluster.get('CPU', 0):g}")
        if gpus > cluster.get("GPU", 0):
            raise ConfigError("resources.gpus", f"{gpus:g} per trial, but the Ray cluster has {cluster.get('GPU', 0):g}")
        # Ray sets CUDA_VISIBLE_DEVICES for each trial: its GPU is cuda:0 there
        yield Placement(cpus=cpus, gpus=gpus, device="cuda" if gpus > 0 else "cpu")


def _fit(placement: Placement, *, spec: SweepSpec, trials: list[Trial], metric: str, mode: str, records: dict,
         save: Callable[[], list[Path]], log: Callable[[str], None]) -> None:
    """Run ``trials`` with Ray Tune, keeping ``records`` (and the files, through ``save``) up to date."""
    from ray import tune

    jobs = {t.name: {"scene": dump_scene(t.scene), "base_dir": str(t.scene_path.resolve().parent),
                     "run_dir": str(t.run_dir.resolve()), "device": placement.device} for t in trials}
    by_name = {t.name: t for t in trials}
    scheduler = None
    if spec.early_stop is not None:
        from ray.tune.schedulers import ASHAScheduler

        planned = max(t.scene.optimize.iterations * t.scene.optimize.episodes for t in trials)
        scheduler = ASHAScheduler(time_attr="iteration", metric=spec.early_stop.metric or metric, mode=mode,
                                  max_t=planned, grace_period=min(spec.early_stop.grace, planned),
                                  reduction_factor=spec.early_stop.reduction, stop_last_trials=False)
    callback = _live(by_name=by_name, records=records, metric=metric, save=save, log=log)
    storage = tempfile.mkdtemp(prefix="diffmpm-sweep-tune-")
    try:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, trials=jobs), {"cpu": placement.cpus,
                                                                                      "gpu": placement.gpus}),
            param_space={"trial": tune.grid_search([t.name for t in trials])},
            # a worker runs trial after trial (its imports and Warp's loaded kernels are paid once); each run
            # sets its process state (RNG, threads) itself and sets it back (optimize/run.py's process_state)
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.concurrent, scheduler=scheduler,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name="sweep", storage_path=storage, verbose=0, callbacks=[callback],
                                      failure_config=tune.FailureConfig(max_failures=spec.retries),
                                      log_to_file=False))
        # Tune logs each failed try with its traceback; the sweep says it in one line (the live log, the table)
        quiet = logging.getLogger("ray.tune")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            tuner.fit()
        finally:
            quiet.setLevel(level)
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def _live(**kwargs):
    """A Ray Tune callback keeping each trial's record up to date (defined here: Ray is imported lazily)."""
    from ray import tune

    class Live(tune.Callback):
        def __init__(self, *, by_name, records, metric, save, log):
            self.by_name, self.records, self.metric, self.save, self.log = by_name, records, metric, save, log
            self.done, self.started, self.last = 0, {}, {}

        def __getstate__(self):  # Tune saves its run config (callbacks too); the consoles and files stay here
            return {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.setdefault(trial.config["trial"], time.perf_counter())

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.last[trial.config["trial"]] = dict(result)

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.log(f"{trial.config['trial']}: {_error_line(trial)}; retrying (failure {trial.num_failures})")

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = self.last.get(trial.config["trial"], {})
            # a trial that ends without its own final report was stopped by the scheduler (ASHA)
            self._finish(trial, result, status=result.get("trial_status") or "stopped",
                         error=result.get("trial_error") or None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finish(trial, self.last.get(trial.config["trial"], {}), status="error", error=_error_line(trial))

        def _finish(self, trial, result, *, status, error):
            name = trial.config["trial"]
            t = self.by_name[name]
            metrics = {k: result[k] for k in _metric_keys(result)}
            summary = read_summary(t.run_dir) if status == "finished" else None
            wall = (summary or {}).get("wall_s") or time.perf_counter() - self.started.get(name, time.perf_counter())
            self.records[name] = make_record(t, metric=self.metric, status=status, metrics=metrics, error=error,
                                             iterations=result.get("iteration"), retries=trial.num_failures,
                                             session=self.records[name]["session"], wall_s=wall)
            self.done += 1
            value = metrics.get(self.metric)
            shown = f" {self.metric} {value:.6g}" if isinstance(value, (int, float)) else ""
            retried = f", retried {trial.num_failures}x" if trial.num_failures else ""
            self.log(f"[{self.done}/{len(self.by_name)}] {name}: {status}{shown}{retried}" + (f": {error}" if error
                                                                                            else ""))
            self.save()

    return Live(**kwargs)


# what Tune adds to every result (not metrics of the run)
TUNE_KEYS = {"iteration", "trial_status", "trial_error", "iterations_planned", "timestamp", "checkpoint_dir_name", "done",
             "training_iteration", "trial_id", "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip",
             "config", "time_since_restore", "iterations_since_restore", "experiment_tag", "should_checkpoint"}


def _metric_keys(result: dict) -> list[str]:
    return [k for k, v in result.items() if k not in TUNE_KEYS and isinstance(v, (int, float))]


def _error_line(trial) -> str:
    """The last line of a trial's error trace (what went wrong, without the traceback)."""
    try:
        text = trial.get_error()
    except Exception:  # noqa: BLE001 - the error file may be gone with Tune's storage; say so, never raise here
        text = None
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "the worker died"
