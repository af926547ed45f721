"""`diffmpm bench ...`: benchmarks that print a table and write JSON."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .common import handle_errors, out

EPILOG = """[bold]Examples[/]

  diffmpm bench mpm --particles 4096 --grid 32 --steps 50

  diffmpm bench mpm --particles 1000000 --grid 128 --steps 100 --device cuda --json bench.json

  diffmpm bench mpm --particles 1000000 --grid 128 --shuffle --device cuda
"""

bench_app = typer.Typer(help="Benchmarks (results as a table and, with --json, a file).", no_args_is_help=True)


def _rate(value: float) -> str:
    return f"{value / 1e9:.3f} G" if value >= 1e8 else f"{value / 1e6:.2f} M"


@bench_app.command("mpm", epilog=EPILOG)
@handle_errors
def mpm(
    particles: int = typer.Option(4096, min=1, help="Particles (a cube at 2 per cell per axis)."),
    grid: int = typer.Option(32, min=8, max=512, help="Grid nodes per axis (dx = 1/grid m)."),
    steps: int = typer.Option(50, min=1, help="Steps per timed run."),
    backward_steps: int | None = typer.Option(None, min=1, help="Steps of the forward+backward run (default: --steps)."),
    shuffle: bool = typer.Option(False, "--shuffle", help="Randomly permute the particles (no lattice order)."),
    device: str = typer.Option("cpu", help="cpu or cuda[:i]."),
    material: str = typer.Option("fixed_corotated", help="fixed_corotated or neo_hookean."),
    bspline: str = typer.Option("quadratic", help="quadratic or cubic."),
    repeats: int = typer.Option(5, min=1, help="Timed repetitions (the median is reported)."),
    p2g: str | None = typer.Option(None, help="plain (default) or tiled (shared-memory reduction per block)."),
    sort_every: int = typer.Option(0, min=0, help="Tiled P2G: re-sort particles by cell every N steps (0 = never)."),
    json_file: Path | None = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """MPM throughput: particle-steps per second forward and forward+backward, kernel split, peak memory."""
    from ..bench import bench_mpm
    from ..errors import ConfigError

    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError("--device", f"must be cpu or cuda[:i], got '{device}'")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device", f"'{device}' requested but CUDA is not available here (see diffmpm info)")
    if material not in ("fixed_corotated", "neo_hookean"):
        raise ConfigError("--material", f"must be fixed_corotated or neo_hookean, got '{material}'")
    if p2g not in (None, "plain", "tiled"):
        raise ConfigError("--p2g", f"must be plain or tiled, got '{p2g}'")
    if bspline not in ("quadratic", "cubic"):
        raise ConfigError("--bspline", f"must be quadratic or cubic, got '{bspline}'")
    try:
        result = bench_mpm(particles=particles, grid=grid, steps=steps, shuffle=shuffle, device=device,
                           backward_steps=backward_steps, material=material, bspline=bspline, repeats=repeats,
                           p2g=p2g, sort_every=sort_every)
    except ValueError as exc:
        raise ConfigError("--particles", str(exc)) from exc
    table = Table(title=f"MPM on {result['device_name']}", show_header=False, title_justify="left")
    table.add_column("quantity", style="bold", no_wrap=True)
    table.add_column("value")
    split = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in result["kernel_s_per_step"].items())
    for name, value in [
        ("particles / grid", f"{result['particles']:,} / {grid}^3{' (shuffled)' if shuffle else ''}, "
                             f"{result['p2g']} P2G" + (f", sorted every {sort_every}" if sort_every else "")),
        ("forward", f"{result['forward_s_per_step'] * 1e3:.3f} ms/step = "
                    f"{_rate(result['forward_particle_steps_per_s'])} particle-steps/s"),
        ("kernels (ms/step)", split),
        ("forward+backward", f"{result['forward_backward_s']:.3f} s for {result['backward_steps']} steps = "
                             f"{_rate(result['forward_backward_particle_steps_per_s'])} particle-steps/s"),
        ("taped per step", f"{result['taped_bytes_per_step'] / 2**20:.1f} MiB ({result['segments']} segments)"),
        ("peak memory", f"{result['peak_bytes'] / 2**20:.0f} MiB"),
    ]:
        table.add_row(name, value)
    out.print(table)
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(result, indent=2))
        out.print(f"wrote {json_file}")
