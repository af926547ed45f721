"""What is optimised (scene.loss). Metrics live elsewhere and never share code with this module."""

from __future__ import annotations

import torch

from .sim.op import grid_mass


def silhouette_loss(alphas: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean L1 (or binary cross-entropy) between rendered and target alphas, both in [0, 1]."""
    if kind == "bce":
        a = alphas.clamp(1e-6, 1 - 1e-6)
        return -(target * torch.log(a) + (1 - target) * torch.log(1 - a)).mean()
    return (alphas - target).abs().mean()


def grid_mass_loss(positions: torch.Tensor, masses: torch.Tensor, target_mass: torch.Tensor, *, grid,
                   bspline: str) -> torch.Tensor:
    """Mean squared difference of log(1 + m / m_p) between the particles' and the target's grid mass.

    m_p is the mean particle mass, so a node holding one particle's worth of mass counts as log 2; the gradient is
    the derivative of exactly this value (the seed's version scaled them differently).
    """
    unit = masses.detach().mean()
    mass = grid_mass(positions, masses, grid=grid, bspline=bspline)
    return ((torch.log1p(mass / unit) - torch.log1p(target_mass.to(mass.device) / unit)) ** 2).mean()


def scene_loss(pipeline, output, params: dict[str, torch.Tensor], *, target_alphas: torch.Tensor | None):
    """The scene's weighted loss on the final frame: grid mass, silhouette and the dFc regulariser.

    The image terms rgb_l1 / dssim / depth_l1 come with the optimisation issue; a scene weighting them is refused.
    """
    weights = pipeline.scene.loss
    unsupported = [k for k in ("rgb_l1", "dssim", "depth_l1", "dFc_smooth") if getattr(weights, k) > 0]
    if unsupported:
        raise NotImplementedError(f"loss terms not implemented yet: {', '.join(unsupported)}")
    total = torch.zeros((), device=pipeline.device)
    if weights.grid_mass > 0:
        assets = pipeline.assets
        total = total + weights.grid_mass * grid_mass_loss(
            output.result.x[-1], assets.source.masses.to(pipeline.device), assets.target_grid_mass, grid=assets.grid,
            bspline=pipeline.scene.sim.bspline)
    if weights.silhouette > 0 and target_alphas is not None:
        total = total + weights.silhouette * silhouette_loss(output.alphas[-1], target_alphas,
                                                             weights.silhouette_kind)
    if weights.dFc_l2 > 0 and "dFc" in params:
        total = total + weights.dFc_l2 * (params["dFc"] ** 2).mean()
    return total
