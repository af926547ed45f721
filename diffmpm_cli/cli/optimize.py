"""`diffmpm optimize SCENE`: the main job. Exit 0 done, 1 the run failed (NaN), 2 bad input, 130 interrupted."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..optimize.runfolder import interruptible
from .common import DeviceOpt, JsonFlag, SetOpt, check_device, console_for, err, handle_errors, out, print_json

EPILOG = """[bold]Examples[/]

  diffmpm optimize scenes/sphere_to_snowman.yaml

  diffmpm optimize scenes/elastic_drop.yaml --iters 10 --out runs/drop --quiet

  diffmpm optimize sphere_to_snowman --iters 10      (a shipped scene by name)

  diffmpm optimize --resume runs/drop

  for E in 1e4 2e4 4e4; do diffmpm optimize scenes/elastic_drop.yaml --set material.E=$E --json; done
"""


RUN_ROOT = Path("runs")


def _slug(name: str) -> str:
    from ..optimize.runfolder import slug

    return slug(name)


def _default_out(name: str) -> Path:
    return RUN_ROOT / f"{_slug(name)}-{time.strftime('%Y%m%d-%H%M%S')}"


def _scene_out(cfg) -> Path:
    """Where a scene file may send its outputs: runs/<output.dir> (a relative path that stays inside runs/), or
    runs/<name>-<timestamp>. Only --out on the command line writes elsewhere."""
    from ..errors import ConfigError

    if cfg.output.dir is None:
        return _default_out(cfg.name)
    wanted = Path(cfg.output.dir)
    if wanted.is_absolute() or ".." in wanted.parts or not wanted.parts:
        raise ConfigError("output.dir", "must be a relative folder inside runs/ (a scene file cannot write elsewhere; "
                                        "use --out for that)")
    return RUN_ROOT / wanted


def _resume_config(run_dir: Path, scene: Path | None, overrides: list[str]):
    """The configuration of a resumed run: its own config.resolved.yaml. SCENE, when given, must be the same scene
    and --set may not change it (only --iters may change, and is saved); refused with exit 2 otherwise."""
    from ..config import load_scene
    from ..errors import ConfigError
    from ..optimize.runfolder import CONFIG, config_difference

    saved = load_scene(run_dir / CONFIG)
    wanted = load_scene(run_dir / CONFIG, overrides)
    ignore = {"optimize.iterations"}
    if scene is not None:
        given = load_scene(scene, overrides)
        found = config_difference(wanted, given, ignore=ignore)
        if found is not None:
            key, theirs, yours = found
            raise ConfigError("SCENE", f"{scene} is not the scene of the run in {run_dir} ({key}: {yours} here, "
                                       f"{theirs} in the run); resume with --resume {run_dir} alone")
    found = config_difference(saved, wanted, ignore=ignore)
    if found is not None:
        key, before, after = found
        raise ConfigError("--set", f"{key}: a resumed run keeps the configuration it started with ({before} in the "
                                   f"run, {after} asked for); only --iters may change; start a new run instead")
    return wanted


@handle_errors
@interruptible
def optimize(
    scene: Annotated[Path | None, typer.Argument(help="Scene YAML file, or the name of a shipped scene (diffmpm "
                                                      "scenes); not needed with --resume.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default runs/<scene>-<timestamp>); "
                                                               "new or empty.")] = None,
    iters: Annotated[int | None, typer.Option("--iters", min=0, help="Iterations (default: optimize.iterations); "
                                                                     "saved with the run, so --resume goes as "
                                                                     "far.")] = None,
    device: DeviceOpt = "cpu",
    set_: SetOpt = [],  # noqa: B006 (Typer copies it)
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this folder from its latest "
                                                                 "intact checkpoint, with its own "
                                                                 "configuration.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar: one log line every 10 iterations.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Optimise a scene: simulate, render, compare with the targets, back-propagate, step; write the outputs."""
    from ..errors import ConfigError
    from ..optimize.runfolder import RunFolder
    from .scenes import resolve_scene

    check_device(device)
    overrides = [*set_, *([f"optimize.iterations={iters}"] if iters is not None else [])]
    if resume is not None:
        if out_dir is not None and Path(out_dir) != Path(resume):
            raise ConfigError("--out", "not with --resume (a resumed run writes into its own folder)")
        folder = RunFolder(resume, resume=True, option="--resume")
        folder.check()
        folder.acquire()  # at once: a run still writing here is refused before anything else
        scene = resolve_scene(scene) if scene is not None else None
    elif scene is None:
        raise ConfigError("SCENE", "give a scene file (or --resume RUN_DIR)")
    else:
        scene = resolve_scene(scene)
        folder = None
        if out_dir is not None:
            folder = RunFolder(out_dir, resume=False, option="--out")
            folder.check()
            if folder.path.exists():
                folder.acquire()
    with contextlib.ExitStack() as stack:
        if folder is not None:
            stack.callback(folder.release)
        _optimize(scene=scene, out_dir=out_dir, resume=resume, folder=folder, overrides=overrides, device=device,
                  quiet=quiet, as_json=as_json)


def _optimize(*, scene, out_dir, resume, folder, overrides, device, quiet, as_json) -> None:
    from ..assets import build_assets
    from ..config import load_scene
    from ..optimize.evaluate import main_metric, validity_line
    from ..optimize.run import StopFlag
    from ..optimize.run import optimize as run_optimize
    from ..optimize.runfolder import RunFolder, check_not_interrupted

    if resume is not None:
        cfg = _resume_config(resume, scene, overrides)
        out_dir = resume
    else:
        cfg = load_scene(scene, overrides)
        if out_dir is None:
            out_dir = _scene_out(cfg)
            folder = RunFolder(out_dir, resume=False, option="output.dir")
            folder.check()
    assets = build_assets(cfg, device=device)
    check_not_interrupted()  # before the run's own handler: a Ctrl-C swallowed while the assets' libraries loaded
    log = console_for(as_json)
    stop = StopFlag()

    def on_sigint(signum, frame):
        if stop.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop.requested = True
        log.print("[yellow]stopping after this iteration (checkpoint) ... Ctrl-C again to abort[/]")

    def notice(text: str) -> None:
        err.print(f"note: {text}", markup=False, highlight=False, soft_wrap=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    total = cfg.optimize.iterations * cfg.optimize.episodes
    common = dict(scene=cfg, assets=assets, out_dir=out_dir, device=device, resume=resume is not None, stop=stop,
                  notice=notice, folder=folder)
    try:
        if quiet or not sys.stderr.isatty():
            def progress(i, n, record):
                if quiet and i % 10 and i != n:
                    return
                name, value = main_metric(record)
                log.print(f"iter {i}/{n}  loss {record['loss']:.5g}  {name} {value:.4f}  {validity_line(record)}  "
                          f"{record['step_s']:.2f} s" + _line_search_note(record))

            summary = run_optimize(**common, progress=progress)
        else:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=log) as bar:
                task = bar.add_task(f"optimize {cfg.name}", total=total, status="")

                def progress(i, n, record):
                    name, value = main_metric(record)
                    status = f"loss {record['loss']:.4g}  {name} {value:.3f}  {validity_line(record)}"
                    bar.update(task, completed=i, total=n, status=status + _line_search_note(record))

                summary = run_optimize(**common, progress=progress)
    finally:
        signal.signal(signal.SIGINT, previous)
    if as_json:
        print_json(summary)
        return
    first, last = summary["initial"], summary["final"]
    name, value = summary["main_metric"]
    out.print(f"[bold]{escape(cfg.name)}[/]: loss {first['loss']:.4g} -> {last['loss']:.4g}, {name} {first[name]:.4f} "
              f"-> {value:.4f}" + (f", chamfer {first['chamfer']:.4f} -> {last['chamfer']:.4f}" if "chamfer" in last
                                   else "") + f" in {summary['wall_s']:.1f} s")
    if "exact_iou_mean" in last:
        out.print(f"against the exact target mesh ({summary['evaluation_size']}² px, 12 views): IoU "
                  f"{first['exact_iou_mean']:.4f} -> {last['exact_iou_mean']:.4f}, chamfer {first['chamfer_exact']:.4f}"
                  f" -> {last['chamfer_exact']:.4f}; the target's own Gaussians score "
                  f"{summary['target_gaussians_exact_iou_mean']:.4f}")
    if summary.get("physically_valid", True):
        out.print(f"final state physically valid: {validity_line(last)}")
    else:
        out.print(f"[bold red]final state NOT physically valid[/]: {validity_line(last)}, lowest det F "
                  f"{last.get('det_F_min_any_step', last['det_F_min']):.3g}, up to {last['max_per_cell']} particles in "
                  f"one cell (rest {cfg.sim.particles_per_cell ** 3})")
    best = summary.get("best")
    if best is not None:
        out.print(f"final/ holds the last iterate (iteration {summary['iterations']}); checkpoints/best.pt the lowest "
                  f"loss (iteration {best['iteration']}), which `diffmpm render` shows by default", markup=False)
    out.print(f"outputs in {escape(str(out_dir))}")


def _line_search_note(record: dict) -> str:
    return f"  [{record['line_search_note']}]" if record.get("line_search_note") else ""


def register(app: typer.Typer) -> None:
    app.command("optimize", epilog=EPILOG)(optimize)
