"""One trial inside a Ray worker: the same library call `diffmpm optimize` makes, into the trial's run folder,
reporting every iteration's metrics to Ray Tune (for early stopping and the live view) and the final summary.

A trial whose folder holds a finished run reports its summary without running; an unfinished one resumes from its
latest intact checkpoint (optimize/run.py's resume). A trial that fails on purpose (bad parameters, an unstable
time step, a NaN: a DiffMPMError) reports the error and ends normally: rerunning it would fail the same way. Any
other exception, or the worker's death, is a Tune failure, retried up to the sweep's ``retries``.
"""

from __future__ import annotations

import os
from pathlib import Path

# a test hook, read only here: "TRIAL:ITERATION:MARKER" makes the worker of trial TRIAL exit abruptly (os._exit,
# as a killed worker would) once, after iteration ITERATION, creating the file MARKER so that the retry runs on
CRASH_ONCE = "DIFFMPM_SWEEP_TEST_CRASH_ONCE"


def _maybe_crash(trial: str, iteration: int) -> None:
    wanted = os.environ.get(CRASH_ONCE)
    if not wanted:
        return
    name, at, marker = wanted.split(":", 2)
    if name == trial and int(at) == iteration and not Path(marker).exists():
        Path(marker).write_text(f"{os.getpid()}\n")
        os._exit(17)


def numeric(record: dict) -> dict:
    """The numbers of a metrics record (lists and notes left out), booleans as 0/1."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float)):
            out[key] = value
    return out


def run_trial(config: dict, *, trials: dict[str, dict]) -> None:
    """Ray Tune function trainable: ``config["trial"]`` names one of ``trials`` (name -> {scene: resolved YAML
    text, base_dir, run_dir, device, resume}). Reports {iteration, <metrics>} per iteration and then
    {iteration, <final metrics>, trial_status: finished | failed, trial_error}."""
    from ray import tune

    from ..assets import build_assets
    from ..config import scene_from_dict
    from ..config.load import parse_yaml
    from ..errors import DiffMPMError
    from ..optimize.run import optimize
    from ..optimize.runfolder import holds_run
    from .trials import read_summary

    name = config["trial"]
    job = trials[name]
    run_dir = Path(job["run_dir"])
    summary = read_summary(run_dir)
    try:
        scene = scene_from_dict(parse_yaml(job["scene"]), base_dir=Path(job["base_dir"]), default_name=name)
        planned = scene.optimize.iterations * scene.optimize.episodes
        if summary is None or summary.get("failed") or summary.get("iterations", -1) < planned:
            resume = holds_run(run_dir)  # a retried trial (its worker died) goes on from its checkpoint

            def progress(i: int, n: int, record: dict) -> None:
                tune.report({**numeric(record), "iteration": i, "iterations_planned": n})
                _maybe_crash(name, i)

            summary = optimize(scene=scene, assets=build_assets(scene, device=job["device"]), out_dir=run_dir,
                               device=job["device"], resume=resume, progress=progress)
    except DiffMPMError as exc:
        summary = read_summary(run_dir) if getattr(exc, "exit_code", 1) == 1 else None  # a NaN run writes one
        final = numeric(summary["final"]) if summary and summary.get("failed") else {}
        tune.report({**final, "iteration": summary.get("iterations") if final else None, "trial_status": "failed",
                     "trial_error": " ".join(str(exc).split())})
        return
    tune.report({**numeric(summary["final"]), "iteration": summary["iterations"], "trial_status": "finished",
                 "trial_error": ""})
