"""`diffmpm optimize`: the optimisation loop, its log, checkpoints and resume.

``optimize(scene=..., out_dir=...)`` runs the scene's ``optimize`` section: Adam (or SGD) over the learned groups,
each with its own learning rate, a schedule, optional gradient clipping and backtracking line search. Every
iteration appends one line to ``metrics.jsonl``; checkpoints are atomic; ``resume=True`` continues from the latest
checkpoint and, on the CPU, ends bitwise where an uninterrupted run ends.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, DiffMPMError, SimulationError
from ..losses import scene_loss
from ..pipeline import GROUP_OF, Pipeline
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    save_best,
    save_checkpoint,
    set_rng_state,
    start_state,
)
from .evaluate import evaluate_metrics, main_metric, validity_metrics
from .targets import build_targets


class RunFailed(DiffMPMError):
    """The run went wrong (non-finite loss or gradient); the last good checkpoint is kept. Exit code 1."""

    exit_code = 1


class RunInterrupted(DiffMPMError):
    """Ctrl-C: a checkpoint was written; ``--resume`` continues. Exit code 130."""

    exit_code = 130


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


def learned_groups(scene) -> dict[str, float]:
    """Parameter group -> learning rate, for every enabled learn.* section."""
    groups = {GROUP_OF[key]: section.lr for key, section in scene.learn if getattr(section, "enabled", False)}
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


def project_parameters(params: dict[str, torch.Tensor]) -> None:
    """Keep groups inside their valid ranges after a step (nu in (-1, 0.5), colours in [0, 1])."""
    with torch.no_grad():
        if "nu" in params:
            params["nu"].clamp_(-0.95, 0.49)
        if "color" in params:
            params["color"].clamp_(0.0, 1.0)


def _finite(t: torch.Tensor | None) -> bool:
    return t is None or bool(torch.isfinite(t).all())


class Optimization:
    """Everything one run holds: pipeline, targets, parameters, optimiser, schedule."""

    def __init__(self, scene, assets, *, device: str, iterations: int | None = None):
        from ..outputs.pictures import mp4_available

        if scene.output.video in ("mp4", "both") and scene.output.turntable_frames and not mp4_available():
            raise ConfigError("output.video", f"'{scene.output.video}' needs an ffmpeg writer (pip install "
                                              "imageio[ffmpeg]); use gif")
        if scene.optimize.episodes > 1:
            per_frame = [i for i, im in enumerate(scene.target.images) if im.frame not in (None, scene.sim.steps)]
            if scene.target.truth is not None or per_frame:
                raise ConfigError("optimize.episodes", "episodes > 1 need targets of the final state only (a mesh "
                                                       "or final-frame images), not truth or per-frame targets")
        self.scene = scene
        self.per_episode = scene.optimize.iterations if iterations is None else iterations
        self.iterations = self.per_episode * scene.optimize.episodes
        torch.manual_seed(scene.optimize.seed)
        self.pipeline = Pipeline(scene, assets, device=device)
        self.targets = build_targets(self.pipeline)
        rates = learned_groups(scene)
        self.params = {k: v.clone().requires_grad_(True)
                       for k, v in self.pipeline.initial_parameters(list(rates)).items()}
        opt_cfg = scene.optimize
        groups = [{"params": [self.params[k]], "lr": lr, "name": k} for k, lr in rates.items()]
        self.optimizer = (torch.optim.Adam(groups) if opt_cfg.optimizer == "adam" else torch.optim.SGD(groups))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(opt_cfg, self.iterations))

    def episode(self, iteration: int) -> int:
        return iteration // max(self.per_episode, 1)

    def next_episode(self) -> None:
        """The current parameters' final state becomes the start; fresh (zero) controls and optimiser moments."""
        with torch.no_grad():
            result = self.pipeline.simulate(self.params)
            self.pipeline.start = {k: getattr(result, k)[-1].clone() for k in ("x", "v", "F", "C")}
            if "dFc" in self.params:
                self.params["dFc"].zero_()
        self.optimizer.state.clear()

    def loss(self, params=None, *, grad: bool = True):
        params = self.params if params is None else params
        with torch.set_grad_enabled(grad):
            out = self.pipeline.forward(params)
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
            project_parameters(self.params)
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
                project_parameters(self.params)
                physical = True
                try:
                    total, _, out = self.loss(grad=False)
                    trial = float(total)
                    if valid and ls.require_valid:
                        physical = validity_metrics(self.pipeline, out.result)["physically_valid"]
                except SimulationError:  # the step made the simulation blow up: a rejected step, not a failed run
                    trial = math.nan
                if math.isfinite(trial) and trial < loss_value and physical:
                    return {"line_search_tries": attempt + 1, "accepted": True}
                with torch.no_grad():
                    for k, v in self.params.items():
                        v.copy_(saved_params[k])
                self.optimizer.load_state_dict(copy.deepcopy(saved_state))
        finally:
            for g, lr in zip(self.optimizer.param_groups, rates):
                g["lr"] = lr
        # every try failed: retrying the same step next iteration would fail the same way, so change something
        self.scheduler.base_lrs = [lr * ls.shrink for lr in self.scheduler.base_lrs]
        self.optimizer.state.clear()
        return {"line_search_tries": ls.max_tries, "accepted": False,
                "line_search_note": f"step rejected {ls.max_tries}x: learning rates x{ls.shrink:g}, moments reset"}


def _read_history(path: Path, before: int) -> list[dict]:
    """metrics.jsonl lines of iterations < ``before`` (a torn last line from a killed run is dropped)."""
    if not path.exists():
        return []
    history = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("iteration", math.inf) < before:
            history.append(record)
    return history


def optimize(*, scene, assets, out_dir: Path, device: str = "cpu", iterations: int | None = None,
             resume: bool = False, stop: StopFlag | None = None,
             progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Run (or resume) the optimisation of ``scene`` into ``out_dir``; returns the summary (also summary.json)."""
    from ..config import dump_scene
    from .outputs import write_final_outputs

    out_dir = Path(out_dir)
    stop = stop or StopFlag()
    if not str(device).startswith("cuda"):
        # torch's multithreaded CPU reductions sum in a varying order (dFc gradients differ at ~1e-11 between
        # identical runs); one thread makes a CPU run, and its resume, bitwise reproducible for ~7 % of its time.
        # Warp's CPU kernels are single-threaded anyway.
        torch.set_num_threads(1)
    started = time.perf_counter()
    metrics_path = out_dir / "metrics.jsonl"
    ckpt_dir = out_dir / "checkpoints"
    if not resume and metrics_path.exists():
        raise ConfigError("--out", f"{out_dir} already holds a run: use --resume {out_dir} or another folder")
    if not resume and out_dir.is_dir() and any(out_dir.iterdir()):
        # never write summary.json, final/ or checkpoints/ over files that are not this tool's
        raise ConfigError("--out", f"{out_dir} is not empty and holds no diffmpm run: choose a new or empty folder")
    if not resume and out_dir.exists() and not out_dir.is_dir():
        raise ConfigError("--out", f"{out_dir} is a file, not a folder")
    run = Optimization(scene, assets, device=device, iterations=iterations)  # refuses bad input before any write
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out_dir / "config.resolved.yaml").write_text(dump_scene(scene))
    state = RunState()
    if resume:
        remove_stale_temporaries(ckpt_dir)
        latest = latest_checkpoint(ckpt_dir)
        if latest is not None:
            ckpt = load_checkpoint(latest)
            with torch.no_grad():
                for k, v in run.params.items():
                    v.copy_(ckpt["params"][k].to(v.device))
            run.optimizer.load_state_dict(ckpt["optimizer"])
            run.scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            state.iteration, state.best_loss = ckpt["iteration"], ckpt["best_loss"]
            run.pipeline.start = start_state(ckpt, run.pipeline.device)
        # the log holds exactly the iterations before the checkpoint (a killed run may have logged more)
        state.history = _read_history(metrics_path, state.iteration)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in state.history))
    try:
        _loop(run, state, out_dir=out_dir, stop=stop, progress=progress)
    except RunFailed as failure:
        # a rollout that blew up (or a NaN) still leaves final/ and summary.json, from the best parameters so far
        _write_failed_run(run, state, out_dir=out_dir, failure=failure, started=started, device=device)
        raise
    wall = time.perf_counter() - started
    summary = write_final_outputs(run, out_dir, history=state.history, wall_s=wall, device=device)
    summary["main_metric"] = main_metric(summary["final"])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_failed_run(run, state: RunState, *, out_dir: Path, failure: RunFailed, started: float, device: str) -> None:
    from .outputs import write_final_outputs

    best_path = Path(out_dir) / "checkpoints" / "best.pt"
    if state.best_params is None and best_path.exists():
        state.best_params = load_checkpoint(best_path)["params"]
    if state.best_params is None:  # nothing was ever evaluated: nothing to write
        return
    with torch.no_grad():
        for k, v in run.params.items():
            v.copy_(state.best_params[k].to(v.device))
    try:
        summary = write_final_outputs(run, out_dir, history=state.history, wall_s=time.perf_counter() - started,
                                      device=device)
    except DiffMPMError as exc:
        failure.args = (f"{failure}; final outputs from the best parameters failed too: {exc}",)
        return
    summary["main_metric"] = main_metric(summary["final"])
    summary["failed"] = str(failure)
    summary["final_from"] = "best parameters before the failure"
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
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
                    save_best(ckpt_dir, iteration=best_at, params=best, loss=state.best_loss, start=run.pipeline.start)
                run.next_episode()
                # losses of different episodes are not comparable
                best, state.best_loss, state.best_params = None, math.inf, None
            t0 = time.perf_counter()
            run.optimizer.zero_grad(set_to_none=True)
            try:
                total, terms, out = run.loss()
                loss_value = float(total.detach())
                if not math.isfinite(loss_value):
                    raise RunFailed(f"iteration {it}: the loss is {loss_value} (terms: {terms}); the last good "
                                    f"checkpoint is in {ckpt_dir}")
                total.backward()
            except SimulationError as exc:  # the parameters of this iteration make the rollout blow up
                raise RunFailed(f"iteration {it}: {exc}; the last good checkpoint is in {ckpt_dir} (a smaller "
                                "learning rate, optimize.grad_clip or optimize.line_search help)") from exc
            bad = [k for k, v in run.params.items() if not _finite(v.grad)]
            if bad:
                raise RunFailed(f"iteration {it}: non-finite gradient of {', '.join(bad)}; the last good checkpoint "
                                f"is in {ckpt_dir}")
            grad_norm = math.sqrt(sum(float(v.grad.double().pow(2).sum()) for v in run.params.values()
                                      if v.grad is not None))
            metrics = evaluate_metrics(run.pipeline, out, run.targets, run.params)
            if loss_value < state.best_loss:  # these parameters (before the step) are the best so far
                best = state.best_params = {k: v.detach().clone() for k, v in run.params.items()}
                best_at = it
            step_info = run.step(loss_value, valid=metrics["physically_valid"])
            run.scheduler.step()
            record = {"iteration": it, "episode": run.episode(it), "loss": loss_value, **terms, **metrics,
                      "grad_norm": grad_norm, **step_info,
                      "lr": {g["name"]: g["lr"] for g in run.optimizer.param_groups},
                      "step_s": time.perf_counter() - t0}
            log.write(json.dumps(record) + "\n")
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
                                start=run.pipeline.start)
                if best is not None:
                    save_best(ckpt_dir, iteration=best_at, params=best, loss=state.best_loss, start=run.pipeline.start)
                    best = None
            if stop.requested and not last:
                raise RunInterrupted(f"interrupted after iteration {it}: checkpoint written; continue with "
                                     f"--resume {out_dir}")
