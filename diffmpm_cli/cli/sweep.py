"""`diffmpm sweep [SWEEP.yaml]`: many optimisations on Ray Tune, each an ordinary run folder; a table at the end.
Exit 0 done, 1 no trial finished or some ended in an error / unfinished, 2 bad input (or Ray missing), 130 Ctrl-C."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from ..optimize.runfolder import interruptible
from .common import JsonFlag, console_for, err, handle_errors, print_json

EPILOG = """[bold]Examples[/]

  diffmpm sweep scenes/sweeps/drop_E_guess.yaml

  diffmpm sweep --scene elastic_drop --param learn.E.init=1e4,3e4,1e5 --iters 20

  diffmpm sweep --scene sphere_to_snowman --param loss.volume=loguniform:1e-3,1e-1 --samples 4

  diffmpm sweep my_sweep.yaml --address auto      (a running Ray cluster; the same command again resumes)
"""

RUN_ROOT = Path("runs")


class Mode(str, Enum):
    """Which end of the metric is best."""

    min = "min"
    max = "max"


@handle_errors
@interruptible
def sweep(
    sweep_file: Annotated[Path | None, typer.Argument(metavar="SWEEP", help="Sweep YAML file (docs/SWEEPS.md); "
                                                                            "optional with --scene and --param.")] = None,
    scene: Annotated[list[str], typer.Option("--scene", help="Base scene file or shipped scene name (repeatable: "
                                                             "a grid over scenes); replaces the file's scene.")] = [],  # noqa: B006
    param: Annotated[list[str], typer.Option("--param", help="A key to vary: KEY=V1,V2,... (a grid) or "
                                                             "KEY=uniform:LOW,HIGH (also loguniform, randint, "
                                                             "choice); repeatable.")] = [],  # noqa: B006
    set_: Annotated[list[str], typer.Option("--set", help="Override a scene key in every trial, KEY=VALUE "
                                                          "(repeatable).")] = [],  # noqa: B006
    metric: Annotated[str | None, typer.Option(help="Final metric to rank by (default: the main metric).")] = None,
    mode: Annotated[Mode | None, typer.Option(help="Rank by the smallest or the largest value (default: max for "
                                                   "IoU/PSNR, else min).")] = None,
    samples: Annotated[int | None, typer.Option(help="Draws of the distributions per grid point.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the draws.")] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="optimize.iterations of every trial.")] = None,
    concurrent: Annotated[int | None, typer.Option(help="At most this many trials at once (default: as many as the "
                                                        "resources allow).")] = None,
    cpus: Annotated[float | None, typer.Option("--cpus-per-trial", help="CPU cores per trial (default 1).")] = None,
    gpus: Annotated[str | None, typer.Option("--gpus-per-trial", help="GPUs per trial, a fraction shares one "
                                                                      "(default auto: 1 where the cluster has "
                                                                      "GPUs).")] = None,
    retries: Annotated[int | None, typer.Option(help="Retries of a trial whose worker died (default 2).")] = None,
    early_stop: Annotated[bool, typer.Option("--early-stop", help="ASHA early stopping on the per-iteration "
                                                                  "metric (the file's early_stop: sets it up).")] = False,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Sweep folder (default runs/<sweep name>); rerun "
                                                               "into it to resume.")] = None,
    address: Annotated[str | None, typer.Option(help="A running Ray cluster: auto or ray://host:port (default: "
                                                     "a local Ray with this machine's cores and GPUs).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run many optimisations (a grid or random draws of scene keys) on Ray Tune; each trial is a run folder."""
    from ..errors import ConfigError
    from ..optimize.runfolder import slug
    from ..sweep import load_sweep, run_sweep
    from ..sweep.engine import SweepFailed

    gpu_value = None
    if gpus is not None:
        try:
            gpu_value = None if gpus == "auto" else float(gpus)
        except ValueError:
            raise ConfigError("--gpus-per-trial", f"must be a number or auto, got '{gpus}'") from None
    options = {"metric": metric, "mode": mode.value if mode is not None else None, "samples": samples, "seed": seed,
               "iterations": iters, "concurrent": concurrent, "cpus": cpus, "gpus": gpu_value, "retries": retries,
               "early_stop": {} if early_stop else None}
    spec, base = load_sweep(sweep_file, scenes=scene, params=param, sets=set_, options=options)
    scenes = [_scene_path(s, Path.cwd() if scene else base) for s in spec.scenes]
    option = "--out"
    if out_dir is None:
        if spec.out is not None:
            out_dir, option = RUN_ROOT / spec.out, "out"  # the spec keeps it inside runs/
        else:
            out_dir = RUN_ROOT / slug(spec.name)
    # the live lines (a trial finished, failed, was retried) are progress: stderr
    result = run_sweep(spec=spec, scenes=scenes, out=out_dir, address=address, option=option,
                       log=lambda text: err.print(escape(text), soft_wrap=True))
    _print(result, console_for(as_json))
    if as_json:
        print_json({"out": str(result.out), "metric": result.metric, "mode": result.mode, "best": result.best,
                    "trials": result.records})
    if result.exit_code:
        bad = [r for r in result.records if r["status"] in ("error", "unfinished")]
        problem = (f"{len(bad)} trial(s) ended in an error or unfinished: rerun the same command to retry them"
                   if bad else "no trial finished")
        raise SweepFailed(problem)


def _scene_path(name: str, base: Path) -> Path:
    from .scenes import resolve_scene

    path = Path(name)
    if not path.is_absolute() and (base / path).exists():
        return base / path
    return resolve_scene(path)


def _print(result, out) -> None:
    """The table (best first), the best trial's folder, what this session did."""
    metric = result.metric
    retried = any(r["retries"] for r in result.records)
    table = Table(title=f"sweep {escape(str(result.out))}: {len(result.records)} trials by {escape(metric)} "
                        f"({result.mode})", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("trial (run folder)", overflow="fold")
    table.add_column(escape(metric), justify="right")
    table.add_column("loss", justify="right")
    table.add_column("valid")
    table.add_column("iters", justify="right")
    table.add_column("wall s", justify="right")
    if retried:
        table.add_column("retries", justify="right")
    table.add_column("status", overflow="fold")
    for r in result.records:
        status = r["status"] + (" (earlier)" if r["session"] == "skipped" else "")
        if r["error"]:  # whole in sweep.jsonl and sweep.csv
            status += ": " + (r["error"] if len(r["error"]) <= 90 else r["error"][:87] + "...")
        valid = r["metrics"].get("physically_valid")
        cells = [str(r["rank"]), escape(r["trial"]), _number(r["value"]), _number(r["metrics"].get("loss")),
                 "" if valid is None else ("yes" if valid else "[bold red]NO[/]"),
                 "" if r["iterations"] is None else str(r["iterations"]),
                 "" if r["wall_s"] is None else f"{r['wall_s']:.1f}", *([str(r["retries"] or "")] if retried else []),
                 escape(status)]
        table.add_row(*cells, style="bold green" if r is result.best else None)
    if not out.is_terminal:  # a file or a pipe: the table whole, trial names unbroken (as wide as it needs)
        need = Measurement.get(out, out.options.update(max_width=10_000), table).maximum
        out = Console(file=out.file, highlight=False, width=max(out.width, need))
    out.print(table)
    if result.best is not None:
        out.print(f"best: {result.best['trial']} ({metric} {_number(result.best['value'])}): "
                  f"{result.best['run_dir']}", markup=False, soft_wrap=True)
    sessions = [r["session"] for r in result.records]
    out.print(f"{sessions.count('ran')} trial(s) run, {sessions.count('resumed')} resumed, {sessions.count('skipped')} "
              f"done earlier, {sessions.count('refused')} refused; sweep.csv, sweep.jsonl, sweep.png in {result.out}",
              markup=False, soft_wrap=True)


def _number(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.5g}" if isinstance(value, (int, float)) else ""


def register(app: typer.Typer) -> None:
    app.command("sweep", epilog=EPILOG)(sweep)
