"""`diffmpm check-grad SCENE`: autodiff vs central finite differences per stage and parameter group."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from ..optimize.runfolder import interruptible
from .common import DeviceOpt, JsonFlag, SceneArg, SetOpt, check_device, console_for, handle_errors, print_json

EPILOG = """[bold]Examples[/]

  diffmpm check-grad scenes/sphere_to_snowman.yaml

  diffmpm check-grad scenes/sphere_to_snowman.yaml --stage sim --param dFc,E --probes 4 --json > grad.json

  diffmpm check-grad scenes/peanut_to_sphere.yaml --stage all --device cuda

Exit code 0 when every row passes, 1 when any fails, 2 on bad input.
"""


def _parse_list(text: str, allowed, option: str) -> list[str]:
    from ..errors import ConfigError

    items = [t.strip() for t in text.split(",") if t.strip()]
    wrong = [t for t in items if t not in allowed]
    if wrong or not items:
        raise ConfigError(option, f"must be a comma-separated list of {', '.join(allowed)}; got '{text}'")
    return items


def _table(rows, *, rtol: float, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name, justify in [("stage", "left"), ("parameter", "left"), ("probes", "right"), ("worst err", "right"),
                          ("noise", "right"), ("AD", "right"), ("FD", "right"), ("", "left")]:
        table.add_column(name, justify=justify, no_wrap=True)
    for r in rows:
        verdict = "[green]pass[/]" if r.passed else "[bold red]FAIL[/]"
        if r.ad == 0 and r.fd == 0:
            verdict += "*"
        table.add_row(r.stage, r.parameter, str(r.probes), f"{r.worst_rel_error:.1e}", f"{min(r.noise, 99):.0e}",
                      f"{r.ad:.4g}", f"{r.fd:.4g}", verdict)
    table.caption = (f"worst err = |AD - FD| / max(|AD|, |FD|, typical/10) of the worst probe, whose AD and FD are "
                     f"shown; pass: err <= {rtol:g} + noise (3 sigma of the measured FD noise, same scale)"
                     + ("; * = the loss does not depend on it" if any(r.ad == 0 and r.fd == 0 for r in rows) else ""))
    return table


@handle_errors
@interruptible
def check_grad(
    scene: SceneArg,
    stage: Annotated[str, typer.Option(help="Stages, comma-separated: sim, splats, render, all.")] = (
        "sim,splats,render,all"),
    param: Annotated[str, typer.Option(help="Parameter groups, comma-separated (each stage checks those it has, and "
                                            "its own inputs: x and F for splats, means and covars for render).")] = (
        "dFc,E,nu,v0,yield_stress,friction_angle,cohesion,viscosity,hardening,color,opacity,sigma0"),
    probes: Annotated[int, typer.Option(min=1, max=256, help="Random unit directions per parameter.")] = 8,
    coordinates: Annotated[int, typer.Option(min=0, max=64, help="Single-coordinate directions per parameter.")] = 2,
    eps: Annotated[float, typer.Option(min=1e-6, max=1e3, help="Scale of every finite-difference step (1 = "
                                                               "defaults).")] = 1.0,
    rtol: Annotated[float, typer.Option(min=1e-8, max=1.0, help="Relative tolerance.")] = 1e-2,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Seed of the directions and loss weights.")] = 0,
    device: DeviceOpt = "cpu",
    as_json: JsonFlag = False,
    set_: SetOpt = [],  # noqa: B006 (Typer copies it)
) -> None:
    """Compare autodiff directional derivatives with central differences through the real kernels."""
    from ..assets import build_assets
    from ..config import load_scene
    from ..gradcheck import STAGES, check_stages
    from ..pipeline import GROUP_OF, Pipeline
    from .scenes import resolve_scene

    stages = _parse_list(stage, STAGES, "--stage")
    groups = _parse_list(param, tuple(GROUP_OF), "--param")
    check_device(device)
    cfg = load_scene(resolve_scene(scene), set_)
    pipeline = Pipeline(cfg, build_assets(cfg, device=device), device=device)
    rows = check_stages(pipeline, stages=stages, groups=groups, probes=probes, coordinates=coordinates, rtol=rtol,
                        eps_scale=eps, seed=seed)
    log = console_for(as_json)
    log.print(_table(rows, rtol=rtol, title=f"gradient check of '{cfg.name}' on {device}"))
    failed = [r for r in rows if not r.passed]
    if as_json:  # the exit code still says whether every row passed
        print_json({"scene": cfg.name, "device": device, "rtol": rtol, "seed": seed, "passed": not failed,
                    "rows": [asdict(r) for r in rows]}, indent=2)
    if failed:
        log.print(f"[bold red]{len(failed)} of {len(rows)} rows failed[/]")
        raise typer.Exit(1)
    log.print(f"all {len(rows)} rows passed")


def register(app: typer.Typer) -> None:
    app.command("check-grad", epilog=EPILOG)(check_grad)
