"""Metrics of one pipeline output against the targets (metrics.py's own code, never the loss functions)."""

from __future__ import annotations

import math

import torch

from .. import metrics


@torch.no_grad()
def evaluate_metrics(pipeline, output, targets, params: dict[str, torch.Tensor]) -> dict:
    """Silhouette IoU per view and PSNR against the final target frame; Chamfer (normalised by the target's
    bounding-box diagonal) and volumetric IoU against the target mesh; material errors against the truth."""
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
    if truth is not None:
        p = {**pipeline.initial_parameters(["log_E", "nu"]), **params}
        E, nu = float(torch.exp(p["log_E"]).mean()), float(p["nu"].mean())
        out.update(E=E, nu=nu, **metrics.material_errors(E=E, nu=nu, truth_E=truth.E, truth_nu=truth.nu))
    return out


def main_metric(values: dict) -> tuple[str, float]:
    """The one number a progress bar shows: material error when identifying, else silhouette IoU."""
    if "E_rel_error" in values:
        return "E_rel_error", values["E_rel_error"]
    return "silhouette_iou_mean", values["silhouette_iou_mean"]
