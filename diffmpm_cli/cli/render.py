"""`diffmpm render RUN_DIR|SCENE`: pictures of a run's (or a scene's initial) simulated trajectory."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ..optimize.runfolder import interruptible
from .common import DeviceOpt, SetOpt, check_device, handle_errors, out, parse_size


class RenderFormat(StrEnum):
    PNG = "png"  # one file per frame and camera
    GIF = "gif"  # one animation per camera
    MP4 = "mp4"

EPILOG = """[bold]Examples[/]

  diffmpm render runs/sphere_to_snowman-20261124-101500

  diffmpm render runs/drop --checkpoint last --out renders/drop_last

  diffmpm render runs/drop --frames all --format gif --cameras orbit:1 --size 256x256

  diffmpm render scenes/elastic_drop.yaml --frames 0,120,240 --out renders/drop
"""


@handle_errors
@interruptible
def render(
    source: Annotated[Path, typer.Argument(help="A run folder (from diffmpm optimize) or a scene YAML file.")],
    checkpoint: Annotated[str | None, typer.Option(help="With a run folder: best (default: checkpoints/best.pt, the "
                                                        "lowest loss), last (the last iterate, as in final/) or a "
                                                        "file.")] = None,
    cameras: Annotated[str, typer.Option(help="scene (the scene's cameras) or orbit:N (N views around the "
                                              "body).")] = "scene",
    frames: Annotated[str, typer.Option(help="final, all (about 60 steps) or a list of steps, e.g. "
                                             "0,30,60.")] = "final",
    size: Annotated[str | None, typer.Option(help="Image size WIDTHxHEIGHT (default: the scene's).")] = None,
    fmt: Annotated[RenderFormat, typer.Option("--format", help="png (one file per frame and camera), gif or mp4 "
                                                               "(one per camera).")] = RenderFormat.PNG,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN_DIR/renders_<frames>, "
                                                               "or renders/<scene>).")] = None,
    device: DeviceOpt = "cpu",
    set_: SetOpt = [],  # noqa: B006 (Typer copies it)
) -> None:
    """Simulate and render chosen frames from the scene's cameras or an orbit.

    A run folder renders checkpoints/best.pt (the lowest loss); --checkpoint last renders the last iterate (final/)."""
    import contextlib

    from ..errors import ConfigError
    from ..optimize.replay import load_source, parse_frames, render_frames, write_renders
    from ..optimize.runfolder import check_output_file, lock_for_writing, remove_stale_temporaries, slug, write_error
    from ..outputs.pictures import mp4_available
    from .scenes import resolve_scene

    check_device(device)
    if fmt == RenderFormat.MP4 and not mp4_available():
        raise ConfigError("--format", 'mp4 needs imageio-ffmpeg (pip install "diffmpm[video]"); use gif')
    source = resolve_scene(source)
    run_dir = source if source.is_dir() else None
    if checkpoint is not None and run_dir is None:
        raise ConfigError("--checkpoint", "only with a run folder")
    width, height = parse_size(size) if size else (None, None)
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError("--out", f"{out_dir} is not a folder")
        check_output_file(out_dir / "x.png", "--out")
    with contextlib.ExitStack() as stack:
        inside_run = run_dir is not None and (out_dir is None or _inside(out_dir, run_dir))
        if inside_run:  # writing into a run folder: not while a run (or another render) writes there
            stack.callback(lock_for_writing(run_dir, option="RUN_DIR").release)
            remove_stale_temporaries(run_dir)
        scene, pipeline, params, start, label = load_source(source, checkpoint=checkpoint, overrides=set_,
                                                            device=device)
        if width is None:
            width, height = scene.render.width, scene.render.height
        steps = parse_frames(frames, scene.sim.steps)
        if out_dir is None:
            out_dir = run_dir / f"renders_{slug(frames)}" if run_dir is not None else Path("renders") / slug(scene.name)
        kept, names, images = render_frames(pipeline, params, frames=steps, cameras=cameras, size=(width, height),
                                            start=start)
        try:
            written = write_renders(out_dir, frames=kept, names=names, images=images, fmt=fmt)
        except OSError as exc:
            raise write_error(exc, what=str(out_dir)) from exc
    out.print(f"rendered {len(kept)} frame(s) x {len(names)} camera(s) of '{scene.name}' ({label}): "
              f"{len(written)} file(s) in {out_dir}", markup=False)


def _inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def register(app: typer.Typer) -> None:
    app.command("render", epilog=EPILOG)(render)
