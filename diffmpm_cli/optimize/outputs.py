"""What a run leaves behind: iteration renders and the final/ folder (PLYs, trajectory, pictures, summary)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..losses import LOSS_TERMS
from ..outputs.cameras import write_inria_cameras
from ..outputs.pictures import comparison_grid, loss_curves, mp4_available, save_png, to_uint8, write_animation
from ..outputs.ply import UP_ROTATIONS, to_up_axis, write_gaussians_ply, write_particles_ply
from ..params import natural, reported
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
        for start in range(0, count, 8):  # view-dependent colours (a trained 3DGS source) per chunk of views
            gaussians = pipeline.gaussians(x, F, params, viewmats=viewmats[start:start + 8])
            images, _, _ = pipeline.render(*gaussians, with_depth=False, viewmats=viewmats[start:start + 8],
                                           Ks=Ks[start:start + 8], size=size)
            frames.extend(to_uint8(img.cpu()) for img in images)
    return frames


def write_splats(path: Path, means, covars, colors, opacities, *, up_axis: str) -> Path:
    """One 3DGS PLY of Gaussians (torch tensors), turned to ``up_axis`` (outputs/ply.py UP_ROTATIONS)."""
    means, covars = to_up_axis(up_axis, means=means.detach().cpu(), covars=covars.detach().cpu())
    return write_gaussians_ply(path, means=means, covars=covars, colors=colors.detach().cpu(),
                               opacities=opacities.detach().cpu())


def splat_recipe(pipeline, params) -> dict[str, np.ndarray]:
    """What trajectory.npz keeps besides x and F so that ``rebuild_gaussians`` gives every frame's splats: the
    Gaussian mode, the surface embedding (indices [M, k], weights [M, k], offsets [M, k, 3] m, rest normals [M, 3]),
    sigma0 [m], the disc thickness ratio, colours [M, 3], opacities [M] and the export's up axis."""
    with torch.no_grad():
        p = pipeline._with_defaults(params, ("color", "opacity_logit", "log_sigma0"))
        count = pipeline.gaussian_count
        recipe = {"gaussian_mode": np.asarray(pipeline.mode), "up_axis": np.asarray(pipeline.scene.output.up_axis),
                  "sigma0": np.asarray(float(natural("log_sigma0", p["log_sigma0"]))),
                  "thickness": np.asarray(pipeline.thickness),
                  "colors": p["color"].expand(count, 3).cpu().numpy(),
                  "opacities": natural("opacity_logit", p["opacity_logit"]).expand(count).cpu().numpy()}
        if pipeline.embedding is not None:
            e = pipeline.embedding
            recipe.update(embedding_indices=e.indices.cpu().numpy(), embedding_weights=e.weights.cpu().numpy(),
                          embedding_offsets=e.offsets.cpu().numpy(), embedding_normals=e.normals.cpu().numpy())
            if e.rest_covars is not None:  # a trained 3DGS source's own rest shapes
                recipe["embedding_rest_covars"] = e.rest_covars.cpu().numpy()
    return recipe


def rebuild_gaussians(path, *, row: int = -1, up_axis: str | None = None) -> dict[str, np.ndarray]:
    """The splats of kept frame ``row`` of a run's final/trajectory.npz (the Gaussians final/frames/ holds), turned to
    ``up_axis`` (default: the run's output.up_axis): means [M, 3] m, covars [M, 3, 3] m^2, colors [M, 3],
    opacities [M] (float64 numpy), and the frame's ``step``."""
    from ..splats import SurfaceEmbedding, particle_gaussians, surface_gaussians

    with np.load(path) as data:
        if "gaussian_mode" not in data:
            raise ValueError(f"{path}: a trajectory written before splats could be rebuilt from it (no embedding)")
        x, F = (torch.from_numpy(data[k][row]).double() for k in ("x", "F"))
        sigma0 = torch.tensor(float(data["sigma0"]), dtype=torch.float64)
        if str(data["gaussian_mode"]) == "surface":
            embedding = SurfaceEmbedding(**{k: torch.from_numpy(data[f"embedding_{k}"]) for k in
                                            ("indices", "weights", "offsets", "normals", "rest_covars")
                                            if f"embedding_{k}" in data}).to(torch.float64)
            means, covars = surface_gaussians(x, F, embedding, sigma0=sigma0, thickness=float(data["thickness"]))
        else:
            means, covars = particle_gaussians(x, F, sigma0=sigma0)
        up = str(data["up_axis"]) if up_axis is None else up_axis
        means, covars = to_up_axis(up, means=means, covars=covars)
        return {"means": means, "covars": covars, "colors": data["colors"].astype(np.float64),
                "opacities": data["opacities"].astype(np.float64), "step": int(data["steps"][row])}


def source_report(body) -> dict:
    """For a trained 3DGS source: how many Gaussians were read and kept, how many particles they cover and how
    many were filled inside them (the interior a surface-only scene leaves empty); empty for other sources."""
    if body.splats is None:
        return {}
    covered, filled = body.filled
    return {"source_gaussians": {"read": body.splats.read, "kept": body.splats.kept, "sh_degree": body.splats.degree,
                                 "particles_covered": covered, "particles_filled": filled,
                                 "filled_share": filled / max(covered + filled, 1)}}


def write_final_outputs(run, out_dir: Path, *, history: list[dict], wall_s: float, device: str) -> dict:
    """final/: gaussians.ply, frames/frame_<step>.ply (every kept frame), cameras.json (INRIA, the training cameras),
    particles.ply (all in output.up_axis), trajectory.npz (x, F and what rebuild_gaussians needs), comparison.png
    (against the exact target mesh),
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
    up = scene.output.up_axis
    with torch.no_grad():
        means, covars, colors, opacities = pipeline.gaussians(x, F, run.params)
    written.append(write_splats(final / "gaussians.ply", means, covars, colors, opacities, up_axis=up))
    written.append(write_particles_ply(final / "particles.ply", positions=x.cpu().double() @ torch.from_numpy(
        UP_ROTATIONS[up]).T, extra={"J": torch.linalg.det(F).cpu()}))
    if scene.output.frame_plys:  # the animated splat sequence: every kept frame
        with torch.no_grad():
            for row, step in enumerate(out.result.frames):
                written.append(write_splats(final / "frames" / f"frame_{step:06d}.ply",
                                            *pipeline.gaussians(out.result.x[row], out.result.F[row], run.params),
                                            up_axis=up))
    written.append(write_inria_cameras(final / "cameras.json", names=pipeline.camera_names,
                                       viewmats=pipeline.viewmats.detach().cpu().double().numpy(),
                                       Ks=pipeline.Ks.detach().cpu().double().numpy(), width=pipeline.width,
                                       height=pipeline.height, up_axis=up))
    np.savez_compressed(final / "trajectory.npz", steps=np.asarray(out.result.frames),
                        x=out.result.x.detach().cpu().numpy(), F=out.result.F.detach().cpu().numpy(),
                        **splat_recipe(pipeline, run.params))
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
        **source_report(pipeline.assets.source),
        **representation,
        "wall_s": wall_s,
        "mean_step_s": float(np.mean([r["step_s"] for r in history])) if history else None,
        "device": device,
        "device_name": device_name(device),
        "versions": versions(),
        "outputs": [str(p.relative_to(out_dir)) for p in written],
    }
