"""`diffmpm render RUN_DIR|SCENE`: pictures of a run's (or a scene's initial) simulated trajectory."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import SET_HELP, check_device, handle_errors, out, parse_size

EPILOG = """[bold]Examples[/]

  diffmpm render runs/sphere_to_snowman-20261124-101500

  diffmpm render runs/drop --frames all --format gif --cameras orbit:1 --size 256x256

  diffmpm render scenes/elastic_drop.yaml --frames 0,120,240 --out renders/drop
"""


@handle_errors
def render(
    source: Path = typer.Argument(..., help="A run folder (from diffmpm optimize) or a scene YAML file."),
    checkpoint: Path | None = typer.Option(None, help="Checkpoint file (default: the run's best, else its latest)."),
    cameras: str = typer.Option("scene", help="scene (the scene's cameras) or orbit:N (N views around the body)."),
    frames: str = typer.Option("final", help="final, all (about 60 steps) or a list of steps, e.g. 0,30,60."),
    size: str | None = typer.Option(None, help="Image size WIDTHxHEIGHT (default: the scene's)."),
    fmt: str = typer.Option("png", "--format", help="png (one file per frame and camera), gif or mp4 (one per "
                                                    "camera)."),
    out_dir: Path | None = typer.Option(None, "--out", help="Output folder (default RUN_DIR/renders_<frames>, or "
                                                           "renders/<scene>)."),
    device: str = typer.Option("cpu", help="cpu or cuda[:i]."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Simulate and render chosen frames from the scene's cameras or an orbit."""
    from ..errors import ConfigError
    from ..optimize.replay import load_source, parse_frames, render_frames, write_renders
    from ..outputs.pictures import mp4_available

    check_device(device)
    if fmt not in ("png", "gif", "mp4"):
        raise ConfigError("--format", f"must be png, gif or mp4, got '{fmt}'")
    if fmt == "mp4" and not mp4_available():
        raise ConfigError("--format", "mp4 needs imageio-ffmpeg (pip install imageio[ffmpeg]); use gif")
    if checkpoint is not None and not source.is_dir():
        raise ConfigError("--checkpoint", "only with a run folder")
    scene, pipeline, params, label = load_source(source, checkpoint=checkpoint, overrides=set_, device=device)
    width, height = parse_size(size) if size else (scene.render.width, scene.render.height)
    steps = parse_frames(frames, scene.sim.steps)
    kept, names, images = render_frames(pipeline, params, frames=steps, cameras=cameras, size=(width, height))
    if out_dir is None:
        out_dir = source / f"renders_{frames.replace(',', '-')}" if source.is_dir() else Path("renders") / scene.name
    written = write_renders(out_dir, frames=kept, names=names, images=images, fmt=fmt)
    out.print(f"rendered {len(kept)} frame(s) x {len(names)} camera(s) of '{scene.name}' ({label}): "
              f"{len(written)} file(s) in {out_dir}")


def register(app: typer.Typer) -> None:
    app.command("render", epilog=EPILOG)(render)
