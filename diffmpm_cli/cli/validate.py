"""`diffmpm validate SCENE`: load, check, build the assets, report; exit 0 when usable, 2 when not."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..sim.grid import above
from .common import JsonFlag, SceneArg, SetOpt, console_for, handle_errors, out, print_json

EPILOG = """[bold]Examples[/]

  diffmpm validate scenes/sphere_to_snowman.yaml

  diffmpm validate scenes/sphere_to_snowman.yaml --set sim.grid_resolution=48 --preview runs/preview

  diffmpm validate scenes/elastic_drop.yaml --json
"""


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _table(s) -> Table:
    table = Table(title=f"scene '{escape(s.name)}'", show_header=False, title_justify="left")
    table.add_column("quantity", style="bold", no_wrap=True)
    table.add_column("value")
    rows = [
        ("source particles", f"{s.source_particles:,}"),
        ("target particles", f"{s.target_particles:,}" if s.target_particles is not None else "(no target mesh)"),
        ("grid", f"{s.grid_shape[0]} x {s.grid_shape[1]} x {s.grid_shape[2]} nodes, {s.bspline} B-spline"),
        ("dx", f"{s.dx:.5g} m (particle spacing {s.particle_spacing:.4g} m)"),
        ("dt", f"{s.dt:.4g} s"),
        ("steps", f"{s.steps} ({s.duration:.4g} s simulated, {s.control_layers} control "
                  f"layer{'s' if s.control_layers != 1 else ''})"),
        ("CFL number", f"{s.cfl:.3f}" if s.cfl_ok else f"{above(s.cfl, s.cfl_limit)}  [bold red]> limit {s.cfl_limit!r}[/]"),
        ("memory, full tape", _bytes(s.memory_full_tape)),
        ("memory, checkpointed", f"{_bytes(s.memory_checkpointed)} ({s.segment_length}-step segments)"),
        ("cameras", str(s.camera_count)),
        ("Gaussians", f"{s.surface_gaussians:,}"),
        ("memory, rendering", f"{_bytes(s.memory_render)} ({s.rendered_frames} frame(s) x {s.camera_count} camera(s))"),
    ]
    rows += [(f"{name} mesh", escape(note)) for name, note in s.meshes.items()]
    for name, value in rows:
        table.add_row(name, value)
    return table


@handle_errors
def validate(
    scene: SceneArg,
    set_: SetOpt = [],  # noqa: B006 (Typer copies it)
    preview: Annotated[Path | None, typer.Option("--preview", help="Write PNG pictures of the particles into this "
                                                                   "folder.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Check a scene and report particle counts, grid, time step, CFL number and memory."""
    from ..assets import build_assets
    from ..config import load_scene
    from ..config.checks import material_starts
    from ..outputs.preview import check_preview_dir, write_previews
    from ..sim.grid import check_cfl, fastest_material
    from ..summary import summarize_scene
    from .scenes import resolve_scene

    if preview is not None:
        check_preview_dir(preview)
    cfg = load_scene(resolve_scene(scene), set_)
    assets = build_assets(cfg)  # the geometry checks: shapes, cameras, target pictures
    cameras = assets.cameras
    summary = summarize_scene(scene=cfg, assets=assets, camera_count=cameras.camera_count)
    if as_json:
        print_json(summary.as_dict(), indent=2)
    else:
        out.print(_table(summary))
    E, nu, density = fastest_material(material_starts(cfg))
    check_cfl(E=E, nu=nu, density=density, dt=cfg.sim.dt, dx=assets.grid.dx,
              limit=cfg.sim.cfl_limit)  # before the previews: a refused scene writes nothing
    if preview is not None:
        for path in write_previews(assets=assets, cameras=cameras, out_dir=preview):
            console_for(as_json).print(f"wrote {path}", markup=False)
    if not as_json:
        out.print("[green]scene is valid[/]")


def register(app: typer.Typer) -> None:
    app.command("validate", epilog=EPILOG)(validate)
