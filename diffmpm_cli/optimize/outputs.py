"""What a run leaves behind: iteration renders and the final/ folder (PLYs, trajectory, pictures, summary)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..losses import LOSS_TERMS
from ..outputs.pictures import comparison_grid, loss_curves, mp4_available, save_png, to_uint8, write_animation
from ..outputs.ply import write_gaussians_ply, write_particles_ply
from ..params import reported
from ..provenance import device_name, versions
from .evaluate import ExactTarget, evaluate_metrics, exact_target_metrics

PICTURE_HEIGHT = 192  # comparison and turntable pictures are upscaled (nearest) to at least this height


def write_iteration_renders(folder: Path, iteration: int, output) -> list[Path]:
    """renders/iter_000010_view0.png ...: the final frame from every camera."""
    images = output.images[-1].detach().cpu()
    return [save_png(Path(folder) / f"iter_{iteration:06d}_view{c}.png", images[c]) for c in range(images.shape[0])]


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    return image.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else image


def render_turntable(pipeline, params, x, F, *, count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``count`` RGB views [H, W, 3] uint8 of a state, orbiting it (render/camera.py turntable_cameras)."""
    from ..render.camera import turntable_cameras

    cams = turntable_cameras(pipeline.scene.render, count=count, default_target=pipeline.assets.grid.center,
                             width=size[0], height=size[1])
    viewmats, Ks = cams.to_torch(pipeline.device)
    frames = []
    with torch.no_grad():
        gaussians = pipeline.gaussians(x, F, params)
        for start in range(0, count, 8):
            images, _, _ = pipeline.render(*gaussians, with_depth=False, viewmats=viewmats[start:start + 8],
                                           Ks=Ks[start:start + 8], size=size)
            frames.extend(to_uint8(img.cpu()) for img in images)
    return frames


def write_final_outputs(run, out_dir: Path, *, history: list[dict], wall_s: float, device: str) -> dict:
    """final/: gaussians.ply, particles.ply, trajectory.npz, comparison.png (against the exact target mesh),
    comparison_training.png, turntable.gif (.mp4), loss.png;
    returns the summary (initial and final metrics, losses, wall time, device, versions, iterations)."""
    pipeline, scene = run.pipeline, run.scene
    final = Path(out_dir) / "final"
    final.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        total, terms, out = run.loss(grad=False)
        initial_params = pipeline.initial_parameters(list(run.params))
        # "initial" is the first episode's start: the rest state
        initial_total, initial_terms, initial = run.loss(initial_params, grad=False, start=None)
    final_metrics = evaluate_metrics(pipeline, out, run.targets, run.params)
    initial_metrics = evaluate_metrics(pipeline, initial, run.targets, initial_params)
    x, F = out.result.x[-1], out.result.F[-1]
    written, representation = [], {}
    if pipeline.assets.target is not None:  # the independent yardstick: the exact target mesh
        exact = ExactTarget(pipeline, size=scene.evaluate.size)
        found, final_images, final_alphas = exact_target_metrics(pipeline, exact, x, F, run.params)
        final_metrics.update(found)
        found, initial_images, _ = exact_target_metrics(pipeline, exact, initial.result.x[-1], initial.result.F[-1],
                                                        initial_params)
        initial_metrics.update(found)
        _, target_alphas = exact.render(pipeline, pipeline.target_gaussians())
        representation = {"target_gaussians_exact_iou_mean": exact.iou(target_alphas)["exact_iou_mean"],
                          "evaluation_size": exact.size, "evaluation_views_seen_in_training": exact.seen}
        exact_rgb = exact.silhouettes[..., None].float().cpu() * torch.ones(3)
        overlay = exact.overlay(final_alphas)
        rows = [[to_uint8(exact_rgb[c]), to_uint8(initial_images[c].cpu()), to_uint8(final_images[c].cpu()),
                 overlay[c]] for c in range(exact_rgb.shape[0])]
        save_png(final / "comparison.png", comparison_grid(rows, labels=["exact target", "initial", "final",
                                                                         "final vs exact"]))
        written.append(final / "comparison.png")
    with torch.no_grad():
        means, covars, colors, opacities = pipeline.gaussians(x, F, run.params)
    written.append(write_gaussians_ply(final / "gaussians.ply", means=means.cpu(), covars=covars.cpu(),
                                       colors=colors.cpu(), opacities=opacities.cpu()))
    written.append(write_particles_ply(final / "particles.ply", positions=x.cpu(),
                                       extra={"J": torch.linalg.det(F).cpu()}))
    np.savez_compressed(final / "trajectory.npz", steps=np.asarray(out.result.frames),
                        x=out.result.x.detach().cpu().numpy(), F=out.result.F.detach().cpu().numpy())
    written.append(final / "trajectory.npz")
    # comparison: target | initial | final, one row per camera with a target at the final target frame
    tf = run.targets.final
    factor = max(1, -(-PICTURE_HEIGHT // pipeline.height))
    rows = []
    for c in range(tf.images.shape[0]):
        if bool(tf.cameras[c]):
            cells = [tf.images[c], initial.images[tf.row][c], out.images[tf.row][c]]
            rows.append([_upscale(to_uint8(cell.cpu()), factor) for cell in cells])
    save_png(final / "comparison_training.png", comparison_grid(rows, labels=["target", "initial", "final"]))
    written.append(final / "comparison_training.png")
    count = scene.output.turntable_frames
    if count:
        size = (pipeline.width * factor, pipeline.height * factor)
        frames = render_turntable(pipeline, run.params, x, F, count=count, size=size)
        if scene.output.video in ("gif", "both"):
            written += write_animation(final / "turntable.gif", frames)
        if mp4_available():  # "mp4"/"both" without a writer are refused before the run starts
            written += write_animation(final / "turntable.mp4", frames)
    keys = ["loss", *sorted({k for r in history for k in r if k in LOSS_TERMS})]
    loss_curves(history, final / "loss.png", keys=keys)
    written.append(final / "loss.png")
    return {
        "scene": scene.name,
        "iterations": len(history),
        "episodes": scene.optimize.episodes,
        "initial": {"loss": float(initial_total), **initial_terms, **initial_metrics},
        "final": {"loss": float(total), **terms, **final_metrics},
        "learned": reported(run.params),
        "physically_valid": bool(final_metrics.get("physically_valid", True)),
        **representation,
        "wall_s": wall_s,
        "mean_step_s": float(np.mean([r["step_s"] for r in history])) if history else None,
        "device": device,
        "device_name": device_name(device),
        "versions": versions(),
        "outputs": [str(p.relative_to(out_dir)) for p in written],
    }
