"""Metrics of one pipeline output against the targets (metrics.py's own code, never the loss functions).

Three families, reported side by side:
- training-view metrics: silhouette IoU and PSNR against the training targets, at the training size;
- physical validity of the state: inverted particles (det F <= 0) in the final state and at any step of the
  rollout, det F statistics, particles piled into cells above 4x their rest count (clumping);
- the independent yardstick (``exact_target_metrics``, at the end of a run): silhouette IoU against the target
  mesh's exact triangle silhouettes from 12 views at ``evaluate.size`` (4 of them at training poses when the
  training rig is the usual 4-view orbit, 8 that training never saw), Chamfer distance to dense samples of the
  exact target surface.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import trimesh

from .. import metrics
from ..params import BY_KEY, natural

CLUMPED_TOLERANCE = 0.01  # a state is physically valid with no inverted particle and at most 1 % clumped
EXACT_SURFACE_SAMPLES = 20_000  # samples of the exact target surface for Chamfer


@torch.no_grad()
def validity_metrics(pipeline, result) -> dict:
    """Physical validity of a rollout's final state (and of every step, from the rollout's det F record). det F is
    the whole deformation gradient's: for snow, whose F holds F_E, det F_E J_P (metrics.deformation_validity)."""
    from ..kernels.materials import PLASTIC_VOLUME_MODELS

    x, F = result.x[-1], result.F[-1]
    grid = pipeline.assets.grid
    Jp = result.Jp[-1] if result.Jp is not None and any(m in PLASTIC_VOLUME_MODELS for m in pipeline.model.models) \
        else None
    deformation = metrics.deformation_validity(F, Jp)
    clump = metrics.clumping(x, lower=grid.lower, dx=grid.dx, shape=grid.shape,
                             rest_count=pipeline.scene.sim.particles_per_cell**3)
    out = {key: deformation[key] for key in ("inverted_share", "det_F_min", "det_F_median")}
    out.update(clumped_share=clump["clumped_share"], max_per_cell=clump["max_per_cell"])
    lowest = result.stats.det_F_min
    if lowest is not None and lowest.numel():
        out["inverted_share_any_step"] = float((lowest <= 0).double().mean())
        out["det_F_min_any_step"] = float(lowest.min())
    inverted = out.get("inverted_share_any_step", out["inverted_share"])
    out["physically_valid"] = bool(inverted == 0 and deformation["nonfinite_share"] == 0
                                   and out["clumped_share"] <= CLUMPED_TOLERANCE)
    return out


@torch.no_grad()
def evaluate_metrics(pipeline, output, targets, params: dict[str, torch.Tensor]) -> dict:
    """Silhouette IoU per view and PSNR against the final target frame; Chamfer (normalised by the target's
    bounding-box diagonal) and volumetric IoU against the target mesh; material errors against the truth;
    physical validity (``validity_metrics``)."""
    out: dict = {}
    tf = targets.final
    cams = tf.cameras
    ious = metrics.silhouette_iou(output.alphas[tf.row][cams], tf.alphas[cams])
    out["silhouette_iou"] = ious
    out["silhouette_iou_mean"] = sum(ious) / len(ious)
    psnrs = metrics.psnr(output.images[tf.row][cams], tf.images[cams])
    finite = [p for p in psnrs if math.isfinite(p)]
    out["psnr_mean"] = sum(finite) / len(finite) if finite else float("inf")
    assets = pipeline.assets
    x, F = output.result.x[-1], output.result.F[-1]
    if assets.target is not None:
        target_surface = assets.target.surface_points.to(x.device)
        out["chamfer"] = metrics.chamfer_distance(pipeline.surface_points(x, F), target_surface,
                                                  normalize_by=metrics.bbox_diagonal(target_surface))
        grid = assets.grid
        out["volume_iou"] = metrics.volumetric_iou(x, assets.target.positions.to(x.device), lower=grid.lower,
                                                   dx=grid.dx, shape=grid.shape)
    truth = pipeline.scene.target.truth
    # a mean over particles of parts that material.regions give different values is no part's value: such keys are
    # left out (summary.json's "materials" has each part's, optimize/outputs.py)
    mixed = set(pipeline.region_values)
    if truth is not None:
        p = {**pipeline.initial_parameters(["log_E", "nu"]), **params}
        E = None if "E" in mixed else float(natural("log_E", p["log_E"]).mean())
        nu = None if "nu" in mixed else float(natural("nu", p["nu"]).mean())
        out.update({k: v for k, v in (("E", E), ("nu", nu)) if v is not None})
        out.update(metrics.material_errors(E=E, nu=nu, truth_E=truth.E, truth_nu=truth.nu))
        for extra in pipeline.material_parameters:  # the plastic or fluid model's own parameters against truths
            if getattr(truth, extra) is None or extra in mixed:
                continue
            spec = BY_KEY[extra]
            value = float(spec.natural({**pipeline.initial_parameters([spec.group]), **params}[spec.group]).mean())
            true = getattr(truth, extra)
            out[extra] = value
            if extra == "friction_angle":  # degrees: an absolute error
                out["friction_angle_abs_error"] = abs(value - true)
            elif extra == "cohesion" and true == 0:  # cohesionless truth: no relative error, the absolute one [Pa]
                out["cohesion_abs_error"] = abs(value - true)
            else:
                out[f"{extra}_rel_error"] = abs(value - true) / true
    out.update(validity_metrics(pipeline, output.result))
    return out


class ExactTarget:
    """The exact target mesh seen from the evaluation views: silhouettes [12, S, S] (bool), dense surface samples,
    and which views coincide with a training camera. Built once per run's final outputs (optimize/outputs.py)."""

    def __init__(self, pipeline, *, size: int):
        from ..render.camera import evaluation_cameras
        from ..render.mesh_raster import mesh_silhouettes

        mesh = pipeline.assets.target.mesh
        self.size = size
        cams = evaluation_cameras(pipeline.scene.render, default_target=pipeline.assets.grid.center, size=size)
        self.viewmats, self.Ks = cams.to_torch(pipeline.device)
        self.silhouettes = mesh_silhouettes(np.asarray(mesh.vertices), np.asarray(mesh.faces), self.viewmats, self.Ks,
                                            size, size, device=pipeline.device)
        surface, _ = trimesh.sample.sample_surface(mesh, EXACT_SURFACE_SAMPLES, seed=0)
        self.surface = torch.as_tensor(np.asarray(surface), dtype=torch.float64, device=pipeline.device)
        self.diagonal = metrics.bbox_diagonal(self.surface)
        centres = _camera_centres(cams.viewmats)
        training = _camera_centres(pipeline.viewmats.detach().cpu().double().numpy())
        scale = np.linalg.norm(centres - np.asarray(pipeline.assets.grid.center), axis=1).max()
        self.seen = [bool(np.min(np.linalg.norm(training - c, axis=1)) <= 1e-3 * scale) for c in centres]

    def iou(self, alphas: torch.Tensor) -> dict:
        """IoU of rendered alphas [12, S, S, 1] against the exact silhouettes: per view, mean, mean of unseen."""
        ious = metrics.silhouette_iou(alphas, self.silhouettes.to(alphas.dtype))
        unseen = [v for v, seen in zip(ious, self.seen) if not seen]
        mine, exact = alphas[..., 0] > 0.5, self.silhouettes
        inside = max(int(exact.sum()), 1)
        return {"exact_iou": ious, "exact_iou_mean": sum(ious) / len(ious),
                "exact_iou_unseen_mean": sum(unseen) / len(unseen) if unseen else None,
                # thin features that were not reached show up as missed pixels; webs and blur as extra ones
                "exact_missed_share": int((exact & ~mine).sum()) / inside,
                "exact_extra_share": int((mine & ~exact).sum()) / inside}

    def render(self, pipeline, gaussians) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [12, S, S, 3] and alphas [12, S, S, 1] of Gaussians (means, covars, colors, opacities) from the
        evaluation views."""
        images, alphas = [], []
        for start in range(0, self.viewmats.shape[0], 4):
            i, a, _ = pipeline.render(*gaussians, with_depth=False, viewmats=self.viewmats[start:start + 4],
                                      Ks=self.Ks[start:start + 4], size=(self.size, self.size))
            images.append(i)
            alphas.append(a)
        return torch.cat(images), torch.cat(alphas)

    def overlay(self, alphas: torch.Tensor) -> np.ndarray:
        """[12, S, S, 3] uint8: grey where render and exact silhouette agree, red where the render misses the
        exact silhouette, blue where it covers what the exact target does not."""
        mine = (alphas[..., 0] > 0.5).cpu().numpy()
        exact = self.silhouettes.cpu().numpy()
        out = np.zeros((*mine.shape, 3), dtype=np.uint8)
        out[mine & exact] = (200, 200, 200)
        out[exact & ~mine] = (230, 40, 40)
        out[mine & ~exact] = (40, 90, 230)
        return out


def _camera_centres(viewmats: np.ndarray) -> np.ndarray:
    """World positions [C, 3] of cameras given world->camera matrices [C, 4, 4]."""
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    return -np.einsum("cji,cj->ci", R, t)


@torch.no_grad()
def exact_target_metrics(pipeline, exact: ExactTarget, x: torch.Tensor, F: torch.Tensor,
                         params: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(metrics, images [12, S, S, 3], alphas [12, S, S, 1]) of one state against the exact target: IoU from the
    evaluation views and Chamfer distance of the carried surface samples to the exact surface (÷ its bounding-box
    diagonal)."""
    images, alphas = exact.render(pipeline, pipeline.gaussians(x, F, params))
    out = exact.iou(alphas)
    out["chamfer_exact"] = metrics.chamfer_distance(pipeline.surface_points(x, F), exact.surface,
                                                    normalize_by=exact.diagonal)
    return out, images, alphas


def main_metric(values: dict) -> tuple[str, float]:
    """The one number a progress bar shows: material error when identifying, else silhouette IoU."""
    for name in ("yield_stress_rel_error", "friction_angle_abs_error", "cohesion_rel_error", "cohesion_abs_error",
                 "viscosity_rel_error", "hardening_rel_error"):
        if name in values:
            return name, values[name]
    if "E_rel_error" in values:
        return "E_rel_error", values["E_rel_error"]
    return "silhouette_iou_mean", values["silhouette_iou_mean"]


def validity_line(values: dict) -> str:
    """'valid' or what makes a state non-physical, for the progress bar and the terminal."""
    inverted = values.get("inverted_share_any_step", values.get("inverted_share", 0.0))
    text = f"inverted {inverted:.1%}  clumped {values.get('clumped_share', 0.0):.1%}"
    return ("valid  " if values.get("physically_valid", True) else "NOT PHYSICAL  ") + text
