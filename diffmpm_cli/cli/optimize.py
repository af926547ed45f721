"""`diffmpm optimize SCENE`: the main job. Exit 0 done, 1 the run failed (NaN), 2 bad input, 130 interrupted."""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

import typer

from .common import SET_HELP, check_device, err, handle_errors, out

EPILOG = """[bold]Examples[/]

  diffmpm optimize scenes/sphere_to_snowman.yaml

  diffmpm optimize scenes/elastic_drop.yaml --iters 10 --out runs/drop --quiet

  diffmpm optimize scenes/sphere_to_snowman.yaml --resume runs/drop

  for E in 1e4 2e4 4e4; do diffmpm optimize scenes/elastic_drop.yaml --set material.E=$E --json; done
"""


RUN_ROOT = Path("runs")


def _slug(name: str) -> str:
    """A scene name as a safe folder name: letters, digits, '.', '_' and '-' only, at most 80 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:80] or "scene"


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


@handle_errors
def optimize(
    scene: Path = typer.Argument(None, help="Scene YAML file (not needed with --resume)."),
    out_dir: Path | None = typer.Option(None, "--out", help="Output folder (default runs/<scene>-<timestamp>)."),
    iters: int | None = typer.Option(None, "--iters", min=0, help="Iterations (default: optimize.iterations)."),
    device: str = typer.Option("cpu", help="cpu or cuda[:i]."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this folder from its latest "
                                                              "checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar: one log line every 10 iterations."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout (logs go to stderr)."),
) -> None:
    """Optimise a scene: simulate, render, compare with the targets, back-propagate, step; write the outputs."""
    from ..assets import build_assets
    from ..config import load_scene
    from ..errors import ConfigError
    from ..optimize.evaluate import main_metric, validity_line
    from ..optimize.run import StopFlag
    from ..optimize.run import optimize as run_optimize

    check_device(device)
    if resume is not None:
        config = resume / "config.resolved.yaml"
        if not config.exists():
            raise ConfigError("--resume", f"{resume} holds no run (no config.resolved.yaml)")
        cfg = load_scene(config, set_)
        out_dir = resume
    elif scene is None:
        raise ConfigError("SCENE", "give a scene file (or --resume RUN_DIR)")
    else:
        cfg = load_scene(scene, set_)
        out_dir = out_dir or _scene_out(cfg)
    assets = build_assets(cfg, device=device)
    log = err if as_json else out
    stop = StopFlag()

    def on_sigint(signum, frame):
        if stop.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop.requested = True
        log.print("[yellow]stopping after this iteration (checkpoint) ... Ctrl-C again to abort[/]")

    previous = signal.signal(signal.SIGINT, on_sigint)
    total = iters if iters is not None else cfg.optimize.iterations
    try:
        if quiet or not sys.stderr.isatty():
            def progress(i, n, record):
                if quiet and i % 10 and i != n:
                    return
                name, value = main_metric(record)
                log.print(f"iter {i}/{n}  loss {record['loss']:.5g}  {name} {value:.4f}  {validity_line(record)}  "
                          f"{record['step_s']:.2f} s" + _line_search_note(record))

            summary = run_optimize(scene=cfg, assets=assets, out_dir=out_dir, device=device, iterations=iters,
                                   resume=resume is not None, stop=stop, progress=progress)
        else:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=log) as bar:
                task = bar.add_task(f"optimize {cfg.name}", total=total, status="")

                def progress(i, n, record):
                    name, value = main_metric(record)
                    status = f"loss {record['loss']:.4g}  {name} {value:.3f}  {validity_line(record)}"
                    bar.update(task, completed=i, total=n, status=status + _line_search_note(record))

                summary = run_optimize(scene=cfg, assets=assets, out_dir=out_dir, device=device, iterations=iters,
                                       resume=resume is not None, stop=stop, progress=progress)
    finally:
        signal.signal(signal.SIGINT, previous)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    first, last = summary["initial"], summary["final"]
    name, value = summary["main_metric"]
    out.print(f"[bold]{cfg.name}[/]: loss {first['loss']:.4g} -> {last['loss']:.4g}, {name} {first[name]:.4f} -> "
              f"{value:.4f}" + (f", chamfer {first['chamfer']:.4f} -> {last['chamfer']:.4f}" if "chamfer" in last
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
    out.print(f"outputs in {out_dir}")


def _line_search_note(record: dict) -> str:
    return f"  [{record['line_search_note']}]" if record.get("line_search_note") else ""


def register(app: typer.Typer) -> None:
    app.command("optimize", epilog=EPILOG)(optimize)
