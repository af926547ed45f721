"""`diffmpm bench ...`: benchmarks that print a table (or, with --json, JSON on stdout)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..enums import BSpline, Material, P2GMode
from ..optimize.runfolder import interruptible
from .common import DeviceOpt, JsonFlag, SceneArg, SetOpt, check_device, console_for, handle_errors, parse_size, print_json

GraphsOpt = Annotated[bool, typer.Option("--graphs/--no-graphs", help="Differentiable rollouts replay captured graphs "
                                         "(as `diffmpm optimize` does) or launch every kernel from the host.")]

RENDER_EPILOG = """[bold]Examples[/]

  diffmpm bench render --gaussians 3000 --size 128x128

  diffmpm bench render --gaussians 1000000 --size 1024x1024 --device cuda --compare-gsplat --json > render.json
"""

EPILOG = """[bold]Examples[/]

  diffmpm bench mpm --particles 4096 --grid 32 --steps 50

  diffmpm bench mpm --particles 1000000 --grid 128 --steps 100 --device cuda --json > bench.json

  diffmpm bench mpm --particles 1000000 --grid 128 --shuffle --device cuda
"""

GROUP_EPILOG = """[bold]Examples[/]

  diffmpm bench mpm --particles 4096 --grid 32 --steps 50

  diffmpm bench render --gaussians 3000 --size 128x128

  diffmpm bench optimize scenes/sphere_to_snowman.yaml --json > it.json
"""

bench_app = typer.Typer(help="Benchmarks (results as a table or, with --json, as JSON on stdout).", no_args_is_help=True,
                        epilog=GROUP_EPILOG)


def _rate(value: float) -> str:
    return f"{value / 1e9:.3f} G" if value >= 1e8 else f"{value / 1e6:.2f} M"


@bench_app.command("mpm", epilog=EPILOG)
@handle_errors
@interruptible
def mpm(
    particles: Annotated[int, typer.Option(min=1, help="Particles (a cube at 2 per cell per axis).")] = 4096,
    grid: Annotated[int, typer.Option(min=8, max=512, help="Grid nodes per axis (dx = 1/grid m).")] = 32,
    steps: Annotated[int, typer.Option(min=1, help="Steps per timed run.")] = 50,
    backward_steps: Annotated[int | None, typer.Option(min=1, help="Steps of the forward+backward run (default: "
                                                                   "--steps).")] = None,
    shuffle: Annotated[bool, typer.Option("--shuffle", help="Randomly permute the particles (no lattice order).")] = False,
    stencil: Annotated[bool, typer.Option("--stencil-order", help="Then put the particles in order of their stencil's "
                                          "base node (4^3-node blocks), as sources do.")] = False,
    device: DeviceOpt = "cpu",
    material: Annotated[Material, typer.Option(help="Constitutive model.")] = Material.FIXED_COROTATED,
    bspline: Annotated[BSpline, typer.Option(help="Transfer kernel.")] = BSpline.QUADRATIC,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repetitions (the median is reported).")] = 5,
    p2g: Annotated[P2GMode, typer.Option(help="plain, or tiled (a shared-memory reduction per block of particles; "
                                              "untaped forward steps only).")] = P2GMode.PLAIN,
    sort_every: Annotated[int, typer.Option(min=0, help="Tiled P2G: re-sort particles by cell every N steps (0 = "
                                                        "never).")] = 0,
    graphs: GraphsOpt = True,
    as_json: JsonFlag = False,
) -> None:
    """MPM throughput: particle-steps per second forward and forward+backward, kernel split, peak memory."""
    from ..bench import bench_mpm
    from ..errors import ConfigError

    check_device(device)
    try:
        result = bench_mpm(particles=particles, grid=grid, steps=steps, shuffle=shuffle, stencil=stencil, device=device,
                           backward_steps=backward_steps, material=material, bspline=bspline, repeats=repeats,
                           p2g=p2g, sort_every=sort_every, graphs=graphs)
    except ValueError as exc:
        raise ConfigError("--particles", str(exc)) from exc
    table = Table(title=f"MPM on {result['device_name']}", show_header=False, title_justify="left")
    table.add_column("quantity", style="bold", no_wrap=True)
    table.add_column("value")
    split = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in result["kernel_s_per_step"].items())
    for name, value in [
        ("particles / grid", f"{result['particles']:,} / {grid}^3{' (shuffled)' if shuffle else ''}"
                             f"{' (stencil order)' if stencil else ''}, "
                             f"{result['p2g']} P2G" + (f", sorted every {sort_every}" if sort_every else "")),
        ("forward", f"{result['forward_s_per_step'] * 1e3:.3f} ms/step = "
                    f"{_rate(result['forward_particle_steps_per_s'])} particle-steps/s"),
        *([("forward, one graph", f"{result['forward_graphed_s_per_step'] * 1e3:.3f} ms/step = "
                                   f"{_rate(result['forward_graphed_particle_steps_per_s'])} particle-steps/s")]
          if result["forward_graphed_s_per_step"] else []),
        ("kernels (ms/step)", split),
        ("forward+backward", f"{result['forward_backward_s']:.3f} s for {result['backward_steps']} steps = "
                             f"{_rate(result['forward_backward_particle_steps_per_s'])} particle-steps/s"
                             f" ({'graphed' if graphs else 'eager'})"),
        ("taped per step", f"{result['taped_bytes_per_step'] / 2**20:.1f} MiB ({result['segments']} segments)"),
        ("peak memory", f"{result['peak_bytes'] / 2**20:.0f} MiB"),
    ]:
        table.add_row(name, value)
    console_for(as_json).print(table)
    if as_json:
        print_json(result, indent=2)


@bench_app.command("render", epilog=RENDER_EPILOG)
@handle_errors
@interruptible
def render(
    gaussians: Annotated[int, typer.Option(min=1, help="Number of Gaussians.")] = 3000,
    size: Annotated[str, typer.Option(help="Image size WIDTHxHEIGHT.")] = "128x128",
    device: DeviceOpt = "cpu",
    compare_gsplat: Annotated[bool, typer.Option("--compare-gsplat", help="Time gsplat on the same tensors "
                                                                          "(CUDA).")] = False,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repetitions (the median is reported).")] = 5,
    as_json: JsonFlag = False,
) -> None:
    """Rasteriser forward and backward time (RGB, one camera); optionally beside gsplat."""
    from ..bench import bench_render
    from ..errors import ConfigError

    width, height = parse_size(size)
    check_device(device)
    if compare_gsplat:
        try:
            import gsplat  # noqa: F401
        except ImportError as exc:
            raise ConfigError("--compare-gsplat", "gsplat is not installed (pip install gsplat==1.5.3)") from exc
        if not device.startswith("cuda"):
            raise ConfigError("--compare-gsplat", "gsplat runs on CUDA only: add --device cuda")
    result = bench_render(gaussians=gaussians, width=width, height=height, device=device,
                          compare_gsplat=compare_gsplat, repeats=repeats)
    table = Table(title=f"rasteriser on {result['device_name']}", show_header=False, title_justify="left")
    table.add_column("quantity", style="bold", no_wrap=True)
    table.add_column("value")
    table.add_row("Gaussians / image", f"{gaussians:,} / {width}x{height} ({result['intersections']:,} tile hits)")
    table.add_row("diffmpm", f"forward {result['forward_s'] * 1e3:.3f} ms, backward {result['backward_s'] * 1e3:.3f} ms")
    if "graph_forward_backward_s" in result:
        table.add_row("as one CUDA graph", f"forward + backward {result['graph_forward_backward_s'] * 1e3:.3f} ms "
                                           f"(capacity {result['graph_capacity']:,})")
    if compare_gsplat:
        table.add_row(f"gsplat {result['gsplat']}", f"forward {result['gsplat_forward_s'] * 1e3:.3f} ms, "
                                                    f"backward {result['gsplat_backward_s'] * 1e3:.3f} ms")
        ratios = (result["ratio_forward"], result["ratio_backward"], result["ratio_forward_backward"])
        table.add_row("ratio (ours / gsplat)", "forward {:.2f}x, backward {:.2f}x, both {:.2f}x".format(*ratios))
    table.add_row("peak memory", f"{result['peak_bytes'] / 2**20:.0f} MiB")
    console_for(as_json).print(table)
    if as_json:
        print_json(result, indent=2)


OPTIMIZE_EPILOG = """[bold]Examples[/]

  diffmpm bench optimize scenes/sphere_to_snowman.yaml

  diffmpm bench optimize scenes/sphere_to_snowman.yaml --device cuda --set sim.grid_resolution=64 --json > it.json
"""


@bench_app.command("optimize", epilog=OPTIMIZE_EPILOG)
@handle_errors
@interruptible
def optimize(
    scene: SceneArg,
    device: DeviceOpt = "cpu",
    repeats: Annotated[int, typer.Option(min=1, help="Timed iterations (the median of each stage is "
                                                     "reported).")] = 5,
    graphs: GraphsOpt = True,
    set_: SetOpt = [],  # noqa: B006 (Typer copies it)
    as_json: JsonFlag = False,
) -> None:
    """Time one optimisation iteration of a scene, split by stage (sim, splats, render, losses; each both ways)."""
    from ..assets import build_assets
    from ..bench import bench_optimize
    from ..config import load_scene
    from .scenes import resolve_scene

    check_device(device)
    cfg = load_scene(resolve_scene(scene), set_)
    result = bench_optimize(scene=cfg, assets=build_assets(cfg, device=device), device=device, repeats=repeats,
                            graphs=graphs)
    sec = result["seconds"]
    mode = "graphed rollouts" if graphs else "eager rollouts"
    table = Table(title=f"one iteration of '{cfg.name}' on {result['device_name']} ({mode})", title_justify="left")
    for name in ("stage", "forward ms", "backward ms"):
        table.add_column(name, justify="left" if name == "stage" else "right")
    for stage in ("sim", "splats", "render", "loss"):
        table.add_row(stage, f"{sec[stage + '_forward'] * 1e3:.2f}", f"{sec[stage + '_backward'] * 1e3:.2f}")
    table.add_row("[bold]iteration[/]", "", f"[bold]{sec['iteration'] * 1e3:.2f}[/]")
    table.caption = (f"{result['particles']:,} particles, {result['gaussians']:,} Gaussians, grid "
                     f"{'x'.join(map(str, result['grid']))}, {result['steps']} steps, {result['cameras']} cameras x "
                     f"{result['frames']} frames at {result['size'][0]}x{result['size'][1]}; peak "
                     f"{result['peak_bytes'] / 2**20:.0f} MiB")
    console_for(as_json).print(table)
    if as_json:
        print_json(result, indent=2)
