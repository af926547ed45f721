"""`diffmpm render`: simulate a run's parameters (or a scene's initial ones) and render chosen frames and cameras."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..params import GROUPS
from .checkpoint import latest_checkpoint, load_checkpoint, start_state


def run_checkpoint(run_dir: Path, which: str | None) -> tuple[Path, str]:
    """(file, label) of a run's checkpoint: ``best`` (default: checkpoints/best.pt, the parameters with the lowest
    loss; the latest checkpoint while there is no best.pt), ``last`` (the newest checkpoint this run wrote: the
    last iterate, what final/ shows) or a file path."""
    folder = Path(run_dir) / "checkpoints"
    which = which or "best"
    if which == "best" and (folder / "best.pt").exists():
        return folder / "best.pt", "best.pt: the lowest loss"
    if which in ("best", "last"):
        latest = latest_checkpoint(folder)
        if latest is None:
            raise ConfigError("RUN_DIR", f"{run_dir} has no checkpoint yet")
        return latest, f"{latest.name}: the last iterate"
    path = Path(which)
    if not path.is_file():
        raise ConfigError("--checkpoint", f"must be best, last or a checkpoint file; no such file: {which}")
    return path, path.name


def load_source(path: Path, *, checkpoint: Path | str | None, overrides=(), device: str = "cpu"):
    """(scene, pipeline, params, start, label) from a run folder (its resolved config and a checkpoint: ``best``
    (the default), ``last`` or a file, see run_checkpoint) or from a scene file (its initial parameters). ``start``:
    the state the checkpoint's episode starts from (None: the rest state)."""
    from ..assets import build_assets
    from ..config import load_scene
    from ..pipeline import Pipeline
    from .checkpoint import shape_mismatch
    from .runfolder import run_config

    path = Path(path)
    label, start = "initial", None
    if path.is_dir():
        scene = load_scene(run_config(path, "RUN_DIR"), overrides)
        checkpoint, label = run_checkpoint(path, None if checkpoint is None else str(checkpoint))
    else:
        scene = load_scene(path, overrides)
    pipeline = Pipeline(scene, build_assets(scene, device=device), device=device)
    params = {}
    if checkpoint is not None:
        state = load_checkpoint(Path(checkpoint))  # CheckpointError (exit 2) for a foreign or torn file
        if not isinstance(state, dict) or not isinstance(state.get("params"), dict) or \
                not all(isinstance(v, torch.Tensor) for v in state["params"].values()):
            raise CheckpointError(str(checkpoint), "not a diffmpm checkpoint (no parameter tensors)")
        wanted = pipeline.initial_parameters([k for k in state["params"] if k in GROUPS])
        problem = shape_mismatch(state, wanted)
        if problem is not None:
            raise CheckpointError(str(checkpoint), f"does not fit this scene: {problem}")
        params = {k: v.to(pipeline.device) for k, v in state["params"].items()}
        try:
            start = start_state(state, pipeline.device)  # a later episode starts where the last ended
        except (AttributeError, TypeError) as exc:
            raise CheckpointError(str(checkpoint), "not a diffmpm checkpoint (a bad 'start')") from exc
        label = f"{label}, iteration {state.get('iteration')}"
    return scene, pipeline, params, start, label


def parse_frames(text: str, steps: int) -> list[int]:
    """final -> [steps]; all -> about 60 evenly spaced steps from 0 to steps; "0,30,60" -> those."""
    if text == "final":
        return [steps]
    if text == "all":
        stride = max(1, steps // 60)
        return sorted({*range(0, steps + 1, stride), steps})
    try:
        frames = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError as exc:
        raise ConfigError("--frames", f"must be final, all or a list of steps like 0,30,60; got '{text}'") from exc
    bad = [f for f in frames if not 0 <= f <= steps]
    if bad or not frames:
        raise ConfigError("--frames", f"steps must lie in 0..{steps}, got '{text}'")
    return frames


def render_frames(pipeline, params, *, frames: list[int], cameras: str, size: tuple[int, int], start=None):
    """(frames, camera names, images [R, C, H, W, 3]) of the states at ``frames`` (of the rollout from ``start``,
    None: the rest state) seen from the scene's cameras (``cameras="scene"``) or an orbit of N (``"orbit:N"``)."""
    from ..render.camera import turntable_cameras

    scene = pipeline.scene
    if cameras == "scene":
        if size != (pipeline.width, pipeline.height):
            from ..render.camera import build_cameras

            render = scene.render.model_copy(update={"width": size[0], "height": size[1]})
            cams = build_cameras(render, default_target=pipeline.assets.grid.center)
        else:
            cams = None
        names = list(pipeline.camera_names)
    elif cameras.startswith("orbit:") and cameras[6:].isdigit() and 0 < int(cameras[6:]) <= 360:
        cams = turntable_cameras(scene.render, count=int(cameras[6:]), default_target=pipeline.assets.grid.center,
                                 width=size[0], height=size[1])
        names = list(cams.names)
    else:
        raise ConfigError("--cameras", f"must be scene or orbit:N (N in 1..360), got '{cameras}'")
    viewmats, Ks = cams.to_torch(pipeline.device) if cams is not None else (pipeline.viewmats, pipeline.Ks)
    with torch.no_grad():
        result = pipeline.simulate(params, start=start, frames=frames)
        images = []
        for row in range(len(result.frames)):  # with a trained 3DGS source's view-dependent colours per camera
            images.append(pipeline.render_views(result.x[row], result.F[row], params, viewmats=viewmats, Ks=Ks,
                                                size=size))
    return list(result.frames), names, torch.stack(images).cpu()


def write_renders(out_dir: Path, *, frames: list[int], names: list[str], images: torch.Tensor, fmt: str,
                  fps: int = 12) -> list[Path]:
    """png: <camera>_step<k>.png per frame and camera; gif/mp4: one animation per camera over the frames."""
    from ..outputs.pictures import save_png, to_uint8, write_animation

    out_dir = Path(out_dir)
    written = []
    for c, name in enumerate(names):
        if fmt == "png":
            written += [save_png(out_dir / f"{name}_step{step:05d}.png", images[r, c]) for r, step in enumerate(frames)]
        else:
            written += write_animation(out_dir / f"{name}.{fmt}", [to_uint8(images[r, c]) for r in range(len(frames))],
                                       fps=fps)
    return written
