"""`diffmpm render`: simulate a run's parameters (or a scene's initial ones) and render chosen frames and cameras."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .checkpoint import latest_checkpoint, load_checkpoint, start_state


def load_source(path: Path, *, checkpoint: Path | None, overrides=(), device: str = "cpu"):
    """(scene, pipeline, params, label) from a run folder (its resolved config and a checkpoint: the given one, else
    best.pt, else the latest) or from a scene file (its initial parameters)."""
    from ..assets import build_assets
    from ..config import load_scene
    from ..pipeline import Pipeline

    path = Path(path)
    if path.is_dir():
        config = path / "config.resolved.yaml"
        if not config.exists():
            raise ConfigError("RUN_DIR", f"{path} holds no run (no config.resolved.yaml)")
        scene = load_scene(config, overrides)
        folder = path / "checkpoints"
        checkpoint = checkpoint or (folder / "best.pt" if (folder / "best.pt").exists() else latest_checkpoint(folder))
        if checkpoint is None:
            raise ConfigError("RUN_DIR", f"{path} has no checkpoint yet")
    else:
        scene = load_scene(path, overrides)
    pipeline = Pipeline(scene, build_assets(scene, device=device), device=device)
    params, label = {}, "initial"
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise ConfigError("--checkpoint", f"no such file: {checkpoint}")
        try:
            state = load_checkpoint(Path(checkpoint))
            params = {k: v.to(pipeline.device) for k, v in state["params"].items()}
            pipeline.start = start_state(state, pipeline.device)  # a later episode starts where the last ended
        except Exception as exc:  # a foreign or torn file
            raise ConfigError("--checkpoint", f"not a diffmpm checkpoint: {checkpoint} ({exc})") from exc
        label = f"iter {state['iteration']}"
    return scene, pipeline, params, label


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


def render_frames(pipeline, params, *, frames: list[int], cameras: str, size: tuple[int, int]):
    """(frames, camera names, images [R, C, H, W, 3]) of the states at ``frames`` seen from the scene's cameras
    (``cameras="scene"``) or an orbit of N (``"orbit:N"``)."""
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
    saved = pipeline.frames
    pipeline.frames = frames
    try:
        with torch.no_grad():
            result = pipeline.simulate(params)
            images = []
            for row in range(len(result.frames)):
                gaussians = pipeline.gaussians(result.x[row], result.F[row], params)
                images.append(pipeline.render(*gaussians, with_depth=False, viewmats=viewmats, Ks=Ks, size=size)[0])
    finally:
        pipeline.frames = saved
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
