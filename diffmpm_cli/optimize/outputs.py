"""What a run leaves behind: iteration renders and the final/ folder (PLYs, trajectory, pictures, summary)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..enums import Material
from ..losses import LOSS_TERMS
from ..outputs.cameras import write_inria_cameras
from ..outputs.pictures import comparison_grid, loss_curves, mp4_available, save_png, to_uint8, write_animation
from ..outputs.ply import UP_ROTATIONS, to_up_axis, write_gaussians_ply, write_particles_ply
from ..params import PARAMS, natural, reported
from ..provenance import device_name, versions
from ..splats import embedding_deformation, sh_basis
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
    images = pipeline.render_views(x, F, params, viewmats=viewmats, Ks=Ks, size=size)
    return [to_uint8(img.cpu()) for img in images]


def _fibonacci_directions(count: int) -> torch.Tensor:
    """``count`` unit vectors spread evenly over the sphere (a Fibonacci lattice), float64 [count, 3]."""
    k = torch.arange(count, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * k / count
    phi = math.pi * (3.0 - math.sqrt(5.0)) * k
    r = torch.sqrt(1.0 - z * z)
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=1)


SH_FIT_DIRECTIONS = _fibonacci_directions(32)  # >= 2l + 1 = 7 well-spread directions per degree l <= 3
SH_CHUNK = 65536  # Gaussians per batch of rotation matrices (32 directions x 15 coefficients each, float64)


def sh_rotations(R: torch.Tensor, degree: int) -> torch.Tensor:
    """[M, K, K] (K = (degree + 1)^2 - 1, float64): the matrices that turn the degree 1..``degree`` SH coefficients
    of one colour channel (the 3DGS order and signs, splats.sh_basis) of Gaussians turned by the orthogonal
    R [M, 3, 3], so that the turned coefficients M s give at direction d what s gives at R^T d:
    sum_j (M s)_j Y_j(d) = sum_k s_k Y_k(R^T d) for every unit d.

    Block diagonal, one (2l+1)^2 block per degree l (each degree's functions turn among themselves); each block is
    solved by least squares from the basis at SH_FIT_DIRECTIONS and at their images R^T d, which the block maps
    exactly, so the fit is exact to rounding."""
    R = R.to(torch.float64)
    K = (degree + 1) ** 2 - 1
    out = torch.zeros(R.shape[0], K, K, dtype=torch.float64, device=R.device)
    if degree == 0:
        return out
    dirs = SH_FIT_DIRECTIONS.to(R.device)
    basis = sh_basis(dirs, degree)  # [P, K]
    turned = sh_basis(dirs @ R, degree)  # [M, P, K]: Y(R^T d); row vectors d @ R = (R^T d)^T
    for band in range(1, degree + 1):
        cols = slice(band * band - 1, (band + 1) ** 2 - 1)
        # Y_l(R^T d) = D_l Y_l(d) at every direction: basis D_l^T = turned, and M_l = D_l^T
        out[:, cols, cols] = torch.linalg.pinv(basis[:, cols]) @ turned[:, :, cols]
    return out


def rotate_sh(sh_rest: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """SH coefficients of degrees 1..3 [M, K, 3] (K = 3, 8 or 15; channels last) of Gaussians turned by the
    orthogonal R [M, 3, 3] (float64): what a 3DGS viewer must hold so that a Gaussian looks from d as the unturned
    one looks from R^T d (``sh_rotations``)."""
    degree = {0: 0, 3: 1, 8: 2, 15: 3}[sh_rest.shape[1]]
    sh_rest, R = sh_rest.to(torch.float64), R.to(torch.float64)
    return torch.cat([torch.einsum("mij,mjc->mic", sh_rotations(R[start:start + SH_CHUNK], degree),
                                   sh_rest[start:start + SH_CHUNK]) for start in range(0, len(R), SH_CHUNK)]) \
        if len(R) else sh_rest.clone()


def polar_rotations(F: torch.Tensor) -> torch.Tensor:
    """The rotation R [M, 3, 3] (float64) of the polar decomposition F = R S (S symmetric positive definite) of
    deformation gradients F [M, 3, 3]: U V^T of the SVD F = U diag(s) V^T. For det F <= 0 (not physical) it is the
    rotation nearest F, U diag(1, 1, -1) V^T."""
    U, _, Vh = torch.linalg.svd(F.to(torch.float64))
    sign = torch.sign(torch.det(U @ Vh))
    U = torch.cat([U[..., :2], U[..., 2:] * torch.where(sign == 0, 1.0, sign)[:, None, None]], dim=-1)
    return U @ Vh


def splat_rotations(F: torch.Tensor, embedding, frame) -> torch.Tensor:
    """The rotation [M, 3, 3] (float64) each trained Gaussian's SH is turned by in a state with particle F [N, 3, 3]:
    the polar rotation of its local deformation Fbar = sum_p w_p F_p times the placement's rotation ``frame`` [3, 3]
    (trained frame -> scene). For a rigid motion (Fbar a rotation) this is what the renderer evaluates, whose SH
    direction is frame^T Fbar^-1 d; under stretch or shear the renderer's Fbar^-1 d leans where R^T d does not, and a
    3DGS file can only hold the rotated coefficients."""
    Fbar = embedding_deformation(F.to(torch.float64), embedding.to(torch.float64))
    return polar_rotations(Fbar) @ torch.as_tensor(np.asarray(frame), dtype=torch.float64, device=Fbar.device)


def write_splats(path: Path, means, covars, colors, opacities, *, up_axis: str, sh_rest=None,
                 rotations=None) -> Path:
    """One 3DGS PLY of Gaussians (torch tensors), turned to ``up_axis`` (outputs/ply.py UP_ROTATIONS). ``sh_rest``
    [M, K, 3]: the degree 1..3 coefficients in the trained scene's frame, written turned by ``rotations``
    [M, 3, 3] (trained frame -> simulation world, ``splat_rotations``) and then by the up axis's rotation."""
    means, covars = to_up_axis(up_axis, means=means.detach().cpu(), covars=covars.detach().cpu())
    if sh_rest is not None and sh_rest.shape[1] > 0:
        up = torch.as_tensor(UP_ROTATIONS[up_axis], dtype=torch.float64)
        sh_rest = rotate_sh(torch.as_tensor(sh_rest).detach().cpu(), up @ rotations.detach().cpu().double())
    return write_gaussians_ply(path, means=means, covars=covars, colors=colors.detach().cpu(),
                               opacities=opacities.detach().cpu(), sh_rest=sh_rest)


def state_splats(pipeline, params, x, F) -> dict:
    """What write_splats takes for one state: means, covars, colors, opacities (degree-0 colours) and, for a trained
    3DGS source with SH degree >= 1, its coefficients and their rotations (``splat_rotations``)."""
    means, covars, colors, opacities = pipeline.gaussians(x, F, params)
    out = {"means": means, "covars": covars, "colors": colors, "opacities": opacities}
    splats = pipeline.splats
    if splats is not None and splats.degree > 0:
        out.update(sh_rest=torch.as_tensor(splats.sh_rest, dtype=torch.float64),
                   rotations=splat_rotations(F.detach(), pipeline.embedding, splats.frame).cpu())
    return out


def splat_recipe(pipeline, params) -> dict[str, np.ndarray]:
    """What trajectory.npz keeps besides x and F so that ``rebuild_gaussians`` gives every frame's splats: the
    Gaussian mode, the surface embedding (indices [M, k], weights [M, k], offsets [M, k, 3] m, rest normals [M, 3]),
    sigma0 [m], the disc thickness ratio, colours [M, 3], opacities [M] and the export's up axis; for a trained 3DGS
    source with SH degree >= 1 also its coefficients ``sh_rest`` [M, K, 3] and placement rotation ``sh_frame``."""
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
        if pipeline.splats is not None and pipeline.splats.degree > 0:  # and its view-dependent colours
            recipe.update(sh_rest=pipeline.splats.sh_rest, sh_frame=pipeline.splats.frame)
    return recipe


def rebuild_gaussians(path, *, row: int = -1, up_axis: str | None = None) -> dict[str, np.ndarray]:
    """The splats of kept frame ``row`` of a run's final/trajectory.npz (the Gaussians final/frames/ holds), turned to
    ``up_axis`` (default: the run's output.up_axis): means [M, 3] m, covars [M, 3, 3] m^2, colors [M, 3],
    opacities [M] (float64 numpy), the frame's ``step`` and, for a trained source with SH degree >= 1, ``sh_rest``
    [M, K, 3] turned as the frame PLYs hold them (write_splats)."""
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
        out = {"colors": data["colors"].astype(np.float64), "opacities": data["opacities"].astype(np.float64),
               "step": int(data["steps"][row])}
        if "sh_rest" in data:
            R = torch.as_tensor(UP_ROTATIONS[up]) @ splat_rotations(F, embedding, data["sh_frame"])
            out["sh_rest"] = rotate_sh(torch.from_numpy(data["sh_rest"]), R).numpy()
        means, covars = to_up_axis(up, means=means, covars=covars)
        return {"means": means, "covars": covars, **out}


def source_report(body) -> dict:
    """For a trained 3DGS source: how many Gaussians were read and kept, how many particles they cover and how
    many were filled inside them (the interior a surface-only scene leaves empty); empty for other sources."""
    if body.splats is None:
        return {}
    covered, filled = body.filled
    return {"source_gaussians": {"read": body.splats.read, "kept": body.splats.kept, "sh_degree": body.splats.degree,
                                 "particles_covered": covered, "particles_filled": filled,
                                 "filled_share": filled / max(covered + filled, 1)}}


def _given(material, region, key: str):
    """material.regions[i].<key> where the region (None: the particles no region holds) gives it, else
    material.<key>."""
    value = getattr(region, key, None)
    return value if value is not None else getattr(material, key)


def material_parts(pipeline, initial_params: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) \
        -> list[dict] | None:
    """summary["materials"] of a scene with material.regions (None without): one entry per part of the source that
    holds particles, the particles no region holds ("material") first, then each region ("regions[i]"), with its
    constitutive model, particle count, density [kg/m^3], the learned keys among its model's, and under "initial"
    and "final" E [Pa], nu and each parameter of its own model (yield_stress [Pa], friction_angle [degrees],
    viscosity [Pa s, or Pa s^N], flow_index, hardening, ...; not another model's) in natural units: the learned
    value where the scene learns the key (over the part's particles: their mean, and "<key>_range" [min, max] where
    they differ), else the region's value, else material.<key>."""
    region = pipeline.assets.source.region
    material = pipeline.scene.material
    if region is None or not material.regions:
        return None
    region = region.cpu()
    learned = {spec.key: spec for spec in PARAMS if spec.group in params}
    parts = [("material", region < 0, None)] + [(f"regions[{i}]", region == i, r)
                                                for i, r in enumerate(material.regions)]
    out = []
    for name, inside, own in parts:
        if not bool(inside.any()):
            continue
        model = _given(material, own, "model")
        keys = ("E", "nu", *Material(model).parameters)
        entry = {"part": name, "model": str(model), "particles": int(inside.sum()),
                 "density": float(_given(material, own, "density")),
                 "learned": [key for key in keys if key in learned]}
        for label, values in (("initial", initial_params), ("final", params)):
            found = {}
            for key in keys:
                if key not in learned:  # the scene's value, as written
                    value = _given(material, own, key)
                    if value is not None:
                        found[key] = float(value)
                    continue
                mine = learned[key].natural(values[learned[key].group].detach().double().cpu())
                mine = mine.expand(len(region))[inside]  # one global value, or the part's particles' own
                found[key] = float(mine.mean())
                if float(mine.max()) > float(mine.min()):
                    found[f"{key}_range"] = [float(mine.min()), float(mine.max())]
            entry[label] = found
        out.append(entry)
    return out


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
        written.append(write_splats(final / "gaussians.ply", **state_splats(pipeline, run.params, x, F), up_axis=up))
    written.append(write_particles_ply(final / "particles.ply", positions=x.cpu().double() @ torch.from_numpy(
        UP_ROTATIONS[up]).T, extra={"J": torch.linalg.det(F).cpu()}))
    if scene.output.frame_plys:  # the animated splat sequence: every kept frame
        with torch.no_grad():
            for row, step in enumerate(out.result.frames):
                written.append(write_splats(final / "frames" / f"frame_{step:06d}.ply", up_axis=up,
                                            **state_splats(pipeline, run.params, out.result.x[row], out.result.F[row])))
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
    parts = material_parts(pipeline, initial_params, run.params)  # several materials: each part's values
    return {
        "scene": scene.name,
        "iterations": len(history),
        "episodes": scene.optimize.episodes,
        "initial": {"loss": float(initial_total), **initial_terms, **initial_metrics},
        "final": {"loss": float(total), **terms, **final_metrics},
        "learned": reported(run.params),
        **({"materials": parts} if parts is not None else {}),
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
