"""`diffmpm optimize`: the optimisation loop, its log, checkpoints and resume.

``optimize(scene=..., out_dir=...)`` runs the scene's ``optimize`` section: Adam (or SGD) over the learned groups,
each with its own learning rate, a schedule, optional gradient clipping and backtracking line search. Every
iteration appends one line to ``metrics.jsonl``; checkpoints are atomic; ``resume=True`` continues from the latest
checkpoint and, on the CPU, ends bitwise where an uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, DiffMPMError, SimulationError
from ..heap import frozen_heap
from ..losses import scene_loss
from ..outputs.files import json_line, write_json, write_text
from ..params import BY_GROUP, GROUP_OF, learned_rates
from ..pipeline import Pipeline
from .checkpoint import (
    forget_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    rng_state,
    save_best,
    save_checkpoint,
    set_rng_state,
    start_state,
)
from .evaluate import evaluate_metrics, main_metric, validity_metrics
from .outputs import write_final_outputs
from .runfolder import CONFIG, METRICS, Interrupted, RunFolder, config_difference, remove_stale_temporaries, write_error
from .targets import build_targets


class RunFailed(DiffMPMError):
    """The run went wrong (non-finite loss or gradient); the last good checkpoint is kept. Exit code 1."""

    exit_code = 1


class RunInterrupted(Interrupted):
    """Ctrl-C: a checkpoint was written; ``--resume`` continues. Exit code 130."""


@dataclass
class StopFlag:
    """Set (e.g. by a SIGINT handler) to stop after the current iteration with a checkpoint."""

    requested: bool = False


@dataclass
class RunState:
    iteration: int = 0
    best_loss: float = math.inf
    history: list[dict] = field(default_factory=list)
    best_params: dict | None = None  # of the current episode, in memory (best.pt holds them on disk)
    started: float = field(default_factory=time.perf_counter)  # this session's start
    wall_before: float = 0.0  # the run's time in earlier sessions, up to the checkpoint this one resumed from
    resumed_from: int | None = None

    def wall(self) -> float:
        """The run's wall time over all its sessions (time after a checkpoint that a kill lost is not counted)."""
        return self.wall_before + time.perf_counter() - self.started


def learned_groups(scene) -> dict[str, float]:
    """Parameter group -> learning rate, for every enabled learn.* section (params.py's order)."""
    groups = learned_rates(scene)
    if not groups:
        raise ConfigError("learn", "nothing is learned: enable at least one of " + ", ".join(GROUP_OF))
    return groups


def _schedule(opt_cfg, iterations: int) -> Callable[[int], float]:
    sched = opt_cfg.schedule

    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / sched.warmup) if sched.warmup else 1.0
        t = it / max(iterations - 1, 1)
        if sched.kind == "cosine":
            return warm * (sched.final_factor + (1 - sched.final_factor) * 0.5 * (1 + math.cos(math.pi * t)))
        if sched.kind == "exponential":
            return warm * sched.final_factor**t
        return warm

    return factor


E_CFL_MARGIN = 1e-3  # a learned E stays this fraction below the largest stable one


@dataclass(frozen=True)
class StableE:
    """What bounds a learned E from above: the time step must stay stable, dt sqrt((lambda + 2 mu) / rho) / dx <=
    sim.cfl_limit, and lambda + 2 mu = E (1 - nu) / ((1 + nu)(1 - 2 nu))."""

    density: float  # kg/m^3
    dt: float  # s
    dx: float  # m
    limit: float
    nu: float  # the Poisson ratio when it is not learned

    def log_E_max(self, nu: torch.Tensor) -> torch.Tensor:
        nu = nu.double()
        modulus = self.density * (self.limit * self.dx / self.dt) ** 2 * (1 - E_CFL_MARGIN)  # max of lambda + 2 mu
        return torch.log(modulus * (1 + nu) * (1 - 2 * nu) / (1 - nu))


def project_parameters(params: dict[str, torch.Tensor], stable: StableE | None = None) -> None:
    """Keep groups inside their valid ranges after a step: each group's bounds (params.py: nu in [-0.95, 0.49],
    colours in [0, 1], E >= E_MIN), and E below the largest E the time step keeps stable (with ``stable``; each
    particle's own nu when both are per particle)."""
    with torch.no_grad():
        for group, value in params.items():
            BY_GROUP[group].project_(value)
        if "log_E" in params and stable is not None:
            log_E = params["log_E"]
            nu = params["nu"] if "nu" in params else torch.tensor(stable.nu)
            high = stable.log_E_max(nu).to(log_E.device)
            if high.shape != log_E.shape:  # one E for particles of several nu: the stiffest bound holds
                high = high.min() if log_E.numel() == 1 else high.expand_as(log_E)
            log_E.copy_(torch.minimum(log_E, high.to(log_E.dtype)))


EPISODE_START = object()  # Optimization.loss's default start: the current episode's starting state


def _finite(t: torch.Tensor | None) -> bool:
    return t is None or bool(torch.isfinite(t).all())


class Optimization:
    """Everything one run holds: pipeline, targets, parameters, optimiser, schedule."""

    def __init__(self, scene, assets, *, device: str, iterations: int | None = None):
        from ..outputs.pictures import mp4_available

        if scene.output.video in ("mp4", "both") and scene.output.turntable_frames and not mp4_available():
            raise ConfigError("output.video", f"'{scene.output.video}' needs an ffmpeg writer (pip install "
                                              '"diffmpm[video]"); use gif')
        if scene.optimize.episodes > 1:
            per_frame = [i for i, im in enumerate(scene.target.images) if im.frame not in (None, scene.sim.steps)]
            if scene.target.truth is not None or per_frame:
                raise ConfigError("optimize.episodes", "episodes > 1 need targets of the final state only (a mesh "
                                                       "or final-frame images), not truth or per-frame targets")
        from ..config.checks import material_starts
        from ..sim.grid import check_cfl, fastest_material

        # as validate does: an unstable dt is bad input, refused before any write
        E_max, nu_max, density = fastest_material(material_starts(scene))
        check_cfl(E=E_max, nu=nu_max, density=density, dt=scene.sim.dt, dx=assets.grid.dx, limit=scene.sim.cfl_limit)
        nu = BY_GROUP["nu"].default(scene)
        self.stable_E = StableE(density=scene.material.density, dt=scene.sim.dt, dx=assets.grid.dx,
                                limit=scene.sim.cfl_limit, nu=nu)
        self.scene = scene
        self.per_episode = scene.optimize.iterations if iterations is None else iterations
        self.iterations = self.per_episode * scene.optimize.episodes
        self.pipeline = Pipeline(scene, assets, device=device)
        self.start: dict[str, torch.Tensor] | None = None  # the episode's starting state (None: the rest state)
        self.targets = build_targets(self.pipeline)
        rates = learned_groups(scene)
        self.params = {k: v.clone().requires_grad_(True)
                       for k, v in self.pipeline.initial_parameters(list(rates)).items()}
        opt_cfg = scene.optimize
        groups = [{"params": [self.params[k]], "lr": lr, "name": k} for k, lr in rates.items()]
        self.optimizer = (torch.optim.Adam(groups) if opt_cfg.optimizer == "adam" else torch.optim.SGD(groups))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(opt_cfg, self.iterations))
        self._before_step = None  # the parameters before the last accepted line-search step
        self._retreats = 0  # retreats in a row (reset by an accepted step)

    def episode(self, iteration: int) -> int:
        return iteration // max(self.per_episode, 1)

    def next_episode(self) -> None:
        """The current parameters' final state becomes the start; fresh (zero) controls and optimiser moments."""
        with torch.no_grad():
            result = self.pipeline.simulate(self.params, start=self.start)
            self.start = {k: getattr(result, k)[-1].clone() for k in ("x", "v", "F", "C", "Jp")}
            if "dFc" in self.params:
                self.params["dFc"].zero_()
        self.optimizer.state.clear()

    def loss(self, params=None, *, grad: bool = True, start=EPISODE_START):
        """(total, terms, output) at ``params`` (default: the current ones) from ``start`` (default: the current
        episode's starting state; None: the rest state)."""
        params = self.params if params is None else params
        start = self.start if start is EPISODE_START else start
        with torch.set_grad_enabled(grad):
            out = self.pipeline.forward(params, start=start)
            total, terms = scene_loss(self.pipeline, out, params, targets=self.targets)
        return total, terms, out

    def step(self, loss_value: float, *, valid: bool = True) -> dict:
        """One optimiser step (with backtracking when enabled). Gradients must be in place.

        ``valid``: whether the state at the current parameters is physically valid; the line search then also
        rejects a step whose state is not (optimize.line_search.require_valid), so a valid run stays valid."""
        opt_cfg = self.scene.optimize
        if opt_cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), opt_cfg.grad_clip)
        if not opt_cfg.line_search.enabled:
            self.optimizer.step()
            project_parameters(self.params, self.stable_E)
            return {}
        ls = opt_cfg.line_search
        saved_params = {k: v.detach().clone() for k, v in self.params.items()}
        saved_state = copy.deepcopy(self.optimizer.state_dict())
        rates = [g["lr"] for g in self.optimizer.param_groups]
        try:
            for attempt in range(ls.max_tries):
                for g, lr in zip(self.optimizer.param_groups, rates):
                    g["lr"] = lr * ls.shrink**attempt
                self.optimizer.step()
                project_parameters(self.params, self.stable_E)
                physical = True
                try:
                    total, _, out = self.loss(grad=False)
                    trial = float(total)
                    if valid and ls.require_valid:
                        physical = validity_metrics(self.pipeline, out.result)["physically_valid"]
                except SimulationError:  # the step made the simulation blow up: a rejected step, not a failed run
                    trial = math.nan
                if math.isfinite(trial) and trial < loss_value and physical:
                    self._before_step, self._retreats = saved_params, 0
                    return {"line_search_tries": attempt + 1, "accepted": True}
                self._restore(saved_params)
                self.optimizer.load_state_dict(copy.deepcopy(saved_state))
        finally:
            for g, lr in zip(self.optimizer.param_groups, rates):
                g["lr"] = lr
        self._slow_down()  # every try failed
        return {"line_search_tries": ls.max_tries, "accepted": False,
                "line_search_note": f"step rejected {ls.max_tries}x: learning rates x{ls.shrink:g}, moments reset"}

    def _restore(self, params: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(params[k])

    def _slow_down(self) -> None:
        """Learning rates x line_search.shrink from the next iteration on (the scheduler applies them), Adam's
        moments dropped: a step that could not be taken would fail the same way if retried unchanged."""
        self.scheduler.base_lrs = [lr * self.scene.optimize.line_search.shrink for lr in self.scheduler.base_lrs]
        self.optimizer.state.clear()

    def retreat(self, problem: str) -> dict | None:
        """For an iteration whose gradient could not be computed (non-finite in the MPM backward pass), with the line
        search on: back to the parameters before the last accepted step (whose gradient was finite), learning rates
        x line_search.shrink, moments reset. None when there is no step to go back over, or after
        line_search.max_tries retreats in a row: the run then fails as it would without a line search."""
        ls = self.scene.optimize.line_search
        if not ls.enabled or self._before_step is None or self._retreats >= ls.max_tries:
            return None
        self._restore(self._before_step)
        self._slow_down()
        self._retreats += 1
        return {"accepted": False, "line_search_note": f"{problem}: back to the previous parameters, learning "
                                                       f"rates x{ls.shrink:g}, moments reset"}


def _read_history(path: Path, before: int) -> list[dict]:
    """metrics.jsonl records of iterations < ``before``. Only the last line may be torn (a run killed while writing
    it) and is then dropped; an unreadable line anywhere else means the log is not this tool's: CheckpointError."""
    if not path.exists():
        return []
    history = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise CheckpointError(str(path), f"line {number} is not JSON ({exc.msg}); the run's log is damaged") from None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise CheckpointError(str(path), f"line {number} is not an iteration record")
        if record["iteration"] < before:
            history.append(record)
    return history


def with_iterations(scene, iterations: int | None):
    """``scene`` with optimize.iterations set to ``iterations`` (``--iters``; saved with the run)."""
    if iterations is None or iterations == scene.optimize.iterations:
        return scene
    return scene.model_copy(update={"optimize": scene.optimize.model_copy(update={"iterations": iterations})})


def optimize(*, scene, assets, out_dir: Path, device: str = "cpu", iterations: int | None = None,
             resume: bool = False, stop: StopFlag | None = None,
             progress: Callable[[int, int, dict], None] | None = None,
             notice: Callable[[str], None] | None = None, folder: RunFolder | None = None) -> dict:
    """Run (or resume) the optimisation of ``scene`` into ``out_dir``; returns the summary (also summary.json).

    ``iterations`` replaces optimize.iterations and is saved in config.resolved.yaml, so a resumed run goes as far.
    A resumed run keeps the configuration it started with: ``scene`` may differ from the run's
    config.resolved.yaml only in optimize.iterations. ``folder``: the run folder, already checked (and maybe
    locked) by the caller; otherwise it is checked here. The folder is locked for the whole run (a second writer
    gets exit 2), and bad input is refused before anything is written. ``notice(text)`` hears what a resume passed
    over (unusable checkpoints, removed temporaries)."""
    out_dir = Path(out_dir)
    stop = stop or StopFlag()
    notice = notice or (lambda text: None)
    scene = with_iterations(scene, iterations)
    own_lock = folder is None
    folder = folder or RunFolder(out_dir, resume=resume)
    if not folder.locked:
        folder.check()
    if resume:
        _check_same_run(out_dir, scene)
    try:
        with process_state(device=device, seed=scene.optimize.seed):
            state = RunState()
            run = Optimization(scene, assets, device=device)  # refuses bad input (an unstable dt) before any write
            folder.acquire(create=not resume)
            return _optimize_locked(run, state, out_dir=out_dir, device=device, resume=resume, stop=stop,
                                    progress=progress, notice=notice)
    finally:
        if own_lock:
            folder.release()


@contextlib.contextmanager
def process_state(*, device: str, seed: int):
    """What a run sets for the whole process, set back afterwards: the torch, numpy and Python RNGs (seeded with
    optimize.seed, restored from checkpoints on resume), on the CPU torch's thread count, and the objects that
    exist at the start frozen out of the cycle collector's full collections (``heap.frozen_heap``).

    torch's multithreaded CPU reductions sum in a varying order (dFc gradients differ at ~1e-11 between identical
    runs); one thread makes a CPU run, and its resume, bitwise reproducible for ~7 % of its time. Warp's CPU
    kernels are single-threaded anyway."""
    threads, saved_rng = torch.get_num_threads(), rng_state()
    if not str(device).startswith("cuda"):
        torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        with frozen_heap():
            yield
    finally:
        torch.set_num_threads(threads)
        set_rng_state(saved_rng)


def _check_same_run(out_dir: Path, scene) -> None:
    from ..config import load_scene

    saved = load_scene(out_dir / CONFIG)
    found = config_difference(saved, scene, ignore={"optimize.iterations"})
    if found is not None:
        key, before, after = found
        raise ConfigError(key, f"is {after} but the run in {out_dir} has {before}: a resumed run keeps the "
                               "configuration it started with (only the iterations may change); start a new run")
    if scene.optimize.episodes > 1 and scene.optimize.iterations != saved.optimize.iterations:
        raise ConfigError("optimize.iterations", "the iterations of a run of several episodes cannot change on resume")


def _optimize_locked(run, state: RunState, *, out_dir: Path, device: str, resume: bool, stop: StopFlag, progress,
                     notice) -> dict:
    """The run, with the folder locked: restore a checkpoint (reading only), then write."""
    from ..config import dump_scene

    metrics_path = out_dir / METRICS
    ckpt_dir = out_dir / "checkpoints"
    point = None
    if resume:
        point = resume_checkpoint(ckpt_dir, run.params)
        if point.checkpoint is not None:
            _restore(run, state, point)
    try:
        if not resume:
            write_text(out_dir / CONFIG, dump_scene(run.scene))
        else:
            for path in remove_stale_temporaries(out_dir):
                notice(f"removed {path}, a temporary file a killed process left")
            for text in point.notes:
                notice(text)
            forget_checkpoints(ckpt_dir, point.unusable)
            if (out_dir / CONFIG).read_text() != dump_scene(run.scene):  # --iters changed
                write_text(out_dir / CONFIG, dump_scene(run.scene))
            # the log holds exactly the iterations before the checkpoint (a killed run may have logged more)
            state.history = _read_history(metrics_path, state.iteration)
            write_text(metrics_path, "".join(json_line(r) for r in state.history))
        try:
            _loop(run, state, out_dir=out_dir, stop=stop, progress=progress)
        except RunFailed as failure:
            # a rollout that blew up (or a NaN) still leaves final/ and summary.json, from the best parameters so far
            _write_failed_run(run, state, out_dir=out_dir, failure=failure, device=device)
            raise
        summary = write_final_outputs(run, out_dir, history=state.history, wall_s=state.wall(), device=device)
        _keep_the_last_iterate_if_best(run, state, ckpt_dir, loss=summary["final"]["loss"])
        summary.update(_run_facts(run, state, out_dir, point))
        summary["main_metric"] = main_metric(summary["final"])
        write_json(out_dir / "summary.json", summary)
        return summary
    except OSError as exc:  # a full disk, a folder made read-only meanwhile: checkpoints are atomic, the last stays
        raise write_error(exc, last_good=latest_checkpoint(ckpt_dir)) from exc


def _restore(run, state: RunState, point) -> None:
    """Load a checkpoint's parameters, optimiser, schedule, RNG and clock into the run (memory only)."""
    ckpt = point.checkpoint
    if ckpt["iteration"] > run.iterations:
        raise ConfigError("--iters", f"the run has already done {ckpt['iteration']} iterations ({point.path}); ask "
                                     "for at least that many")
    try:
        with torch.no_grad():
            for k, v in run.params.items():
                v.copy_(ckpt["params"][k].to(v.device))
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        run.start = start_state(ckpt, run.pipeline.device)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(str(point.path), f"cannot be restored into this run ({first})") from exc
    state.iteration, state.best_loss = ckpt["iteration"], float(ckpt["best_loss"])
    state.wall_before = float(ckpt.get("wall_s", 0.0))
    state.resumed_from = ckpt["iteration"]


def _keep_the_last_iterate_if_best(run, state: RunState, ckpt_dir: Path, *, loss: float) -> None:
    """The last iterate (the parameters after the last step, evaluated for final/) becomes best.pt when its loss is
    lower than that of every iterate the loop evaluated (each before its step): the loop never sees the loss of its
    own last step's result. ``state.best_loss`` is best.pt's loss (saved with it, restored on resume)."""
    if not (math.isfinite(loss) and loss < state.best_loss):
        return
    state.best_loss = loss
    save_best(ckpt_dir, iteration=state.iteration, params=run.params, loss=loss, start=run.start)


def _run_facts(run, state: RunState, out_dir: Path, point) -> dict:
    """What the summary says about the run as a whole: time over all sessions, what final/ and best.pt hold."""
    session = time.perf_counter() - state.started
    facts = {"iterations_planned": run.iterations, "wall_s": state.wall_before + session,
             "wall_s_this_session": session,
             "final_from": f"the last iterate: the parameters after iteration {state.iteration}"}
    if point is not None and point.checkpoint is not None:
        facts["resumed_from_iteration"] = state.resumed_from
    best = Path(out_dir) / "checkpoints" / "best.pt"
    if best.exists():
        saved = load_checkpoint(best)
        facts["best"] = {"file": "checkpoints/best.pt", "iteration": saved.get("iteration"), "loss": saved.get("loss"),
                         "note": "the parameters with the lowest loss (what `diffmpm render RUN` shows by default); "
                                 "final/ holds the last iterate"}
    return facts


def _write_failed_run(run, state: RunState, *, out_dir: Path, failure: RunFailed, device: str) -> None:
    best_path = Path(out_dir) / "checkpoints" / "best.pt"
    if state.best_params is None and best_path.exists():
        state.best_params = load_checkpoint(best_path)["params"]
    if state.best_params is None:  # nothing was ever evaluated: nothing to write
        return
    with torch.no_grad():
        for k, v in run.params.items():
            v.copy_(state.best_params[k].to(v.device))
    try:
        summary = write_final_outputs(run, out_dir, history=state.history, wall_s=state.wall(), device=device)
    except DiffMPMError as exc:
        failure.args = (f"{failure}; final outputs from the best parameters failed too: {exc}",)
        return
    summary["main_metric"] = main_metric(summary["final"])
    summary["failed"] = str(failure)
    summary["final_from"] = "best parameters before the failure"
    write_json(Path(out_dir) / "summary.json", summary)
    failure.args = (f"{failure}; final/ and summary.json were written from the best parameters so far",)


def _loop(run, state: RunState, *, out_dir: Path, stop: StopFlag, progress) -> None:
    """The iterations from ``state.iteration`` to the end (or a stop request, or a failure)."""
    from .outputs import write_iteration_renders

    scene = run.scene
    metrics_path = out_dir / "metrics.jsonl"
    ckpt_dir = out_dir / "checkpoints"
    opt_cfg = scene.optimize
    best, best_at = None, 0
    with metrics_path.open("a") as log:
        while state.iteration < run.iterations:
            it = state.iteration
            if it and it % max(run.per_episode, 1) == 0:  # episode k + 1 starts from episode k's final state
                if best is not None:
                    save_best(ckpt_dir, iteration=best_at, params=best, loss=state.best_loss, start=run.start)
                run.next_episode()
                # losses of different episodes are not comparable
                best, state.best_loss, state.best_params = None, math.inf, None
            t0 = time.perf_counter()
            run.optimizer.zero_grad(set_to_none=True)
            hint = (f"the last good checkpoint is in {ckpt_dir} (a smaller learning rate, optimize.grad_clip or "
                    "optimize.line_search help)")
            try:
                total, terms, out = run.loss()
            except SimulationError as exc:  # the parameters of this iteration make the rollout blow up
                raise RunFailed(f"iteration {it}: {exc}; {hint}") from exc
            loss_value = float(total.detach())
            if not math.isfinite(loss_value):
                raise RunFailed(f"iteration {it}: the loss is {loss_value} (terms: {terms}); the last good "
                                f"checkpoint is in {ckpt_dir}")
            problem = None
            try:
                total.backward()
            except SimulationError as exc:  # a finite rollout whose adjoint overflowed
                problem = str(exc)
            bad = [] if problem else [k for k, v in run.params.items() if not _finite(v.grad)]
            if bad:
                problem = f"non-finite gradient of {', '.join(bad)}"
            metrics = evaluate_metrics(run.pipeline, out, run.targets, run.params)
            if loss_value < state.best_loss:  # these parameters (before the step) are the best so far
                best = state.best_params = {k: v.detach().clone() for k, v in run.params.items()}
                best_at = it
            if problem is None:
                grad_norm = math.sqrt(sum(float(v.grad.double().pow(2).sum()) for v in run.params.values()
                                          if v.grad is not None))
                step_info = run.step(loss_value, valid=metrics["physically_valid"])
            else:
                grad_norm, step_info = None, run.retreat(problem)
                if step_info is None:
                    raise RunFailed(f"iteration {it}: {problem}; {hint}")
            run.scheduler.step()
            record = {"iteration": it, "episode": run.episode(it), "loss": loss_value, **terms, **metrics,
                      "grad_norm": grad_norm, **step_info,
                      "lr": {g["name"]: g["lr"] for g in run.optimizer.param_groups},
                      "step_s": time.perf_counter() - t0}
            log.write(json_line(record))
            log.flush()
            state.history.append(record)
            state.best_loss = min(state.best_loss, loss_value)
            state.iteration = it + 1
            if opt_cfg.render_every and it % opt_cfg.render_every == 0:
                write_iteration_renders(out_dir / "renders", it, out)
            last = state.iteration == run.iterations
            if progress is not None:
                progress(state.iteration, run.iterations, record)
            if last or state.iteration % opt_cfg.checkpoint_every == 0 or stop.requested:
                save_checkpoint(ckpt_dir, iteration=state.iteration, params=run.params, optimizer=run.optimizer,
                                scheduler=run.scheduler, best_loss=state.best_loss, keep=opt_cfg.keep_checkpoints,
                                start=run.start, wall_s=state.wall())
                if best is not None:
                    save_best(ckpt_dir, iteration=best_at, params=best, loss=state.best_loss, start=run.start)
                    best = None
            if stop.requested and not last:
                raise RunInterrupted(f"interrupted after iteration {it}: checkpoint written; continue with "
                                     f"--resume {out_dir}")
