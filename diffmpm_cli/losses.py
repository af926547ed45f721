"""What is optimised (scene.loss). Metrics live in metrics.py and never share code with this module.

Every term is a mean, summed in float64; image terms are averaged over the target frames and, within a frame,
over the cameras that have a target there.
"""

from __future__ import annotations

import torch

from .sim.op import grid_mass

# the terms scene_loss adds, by name: each is a weight of scene.loss (config/schema.py LossConfig; a test holds the
# two together) and a key of summary.json and metrics.jsonl
LOSS_TERMS = ("grid_mass", "silhouette", "rgb_l1", "dssim", "depth_l1", "volume", "dFc_l2", "dFc_smooth")


def l1(residual: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |residual|; with ``signs`` the kink is frozen: mean(signs * residual), the same value and gradient at
    the point the signs were taken (the gradient checker's view of an L1 term, see gradcheck.py)."""
    return (residual.abs() if signs is None else signs * residual).mean()


def silhouette_loss(alphas: torch.Tensor, target: torch.Tensor, kind: str = "l1",
                    signs: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L1 (or binary cross-entropy) between rendered and target alphas, both in [0, 1]."""
    alphas, target = alphas.double(), target.double()
    if kind == "bce":
        a = alphas.clamp(1e-6, 1 - 1e-6)
        return -(target * torch.log(a) + (1 - target) * torch.log(1 - a)).mean()
    return l1(alphas - target, signs)


def _gaussian_window(size: int = 11, sigma: float = 1.5, *, dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def dssim_loss(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(1 - SSIM) / 2 between images [C, H, W, 3] in [0, 1]: 11x11 Gaussian window (sigma 1.5), zero padding,
    constants (0.01)^2 and (0.03)^2, averaged over pixels, channels and views."""
    x = images.double().permute(0, 3, 1, 2)
    y = target.double().permute(0, 3, 1, 2)
    channels = x.shape[1]
    window = _gaussian_window(dtype=x.dtype, device=x.device).expand(channels, 1, 11, 11)

    def blur(t):
        return torch.nn.functional.conv2d(t, window, padding=5, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return (1 - ssim.mean()) / 2


def grid_mass_loss(positions: torch.Tensor, masses: torch.Tensor, target_mass: torch.Tensor, *, grid,
                   bspline: str) -> torch.Tensor:
    """Mean squared difference of log(1 + m / m_p) between the particles' and the target's grid mass.

    m_p is the mean particle mass, so a node holding one particle's worth of mass counts as log 2; the gradient is
    the derivative of exactly this value (the seed's version scaled them differently).
    """
    unit = masses.detach().mean()
    mass = grid_mass(positions, masses, grid=grid, bspline=bspline).double()
    target_mass = target_mass.double().to(mass.device)
    return ((torch.log1p(mass / unit) - torch.log1p(target_mass / unit)) ** 2).mean()


def volume_loss(F: torch.Tensor, *, floor: float = 1.0e-6) -> torch.Tensor:
    """Mean of (ln det F)^2 over deformation gradients F [..., 3, 3] (det clamped at ``floor`` > 0 so an inverted
    particle costs (ln floor)^2 instead of NaN). With volume-preserving controls det F is a particle's true volume
    ratio, so this charges mass piling up (det F << 1) as much as it charges stretching."""
    J = torch.linalg.det(F.double())
    return torch.log(J.clamp_min(floor)).square().mean()


def l1_residuals(pipeline, output, targets):
    """(key, residual) of every L1 image term: silhouette (kind l1), RGB and depth, per target frame."""
    w = pipeline.scene.loss
    for tf in targets.frames:
        cams = tf.cameras
        if w.silhouette > 0 and w.silhouette_kind == "l1":
            yield f"silhouette/{tf.step}", output.alphas[tf.row][cams].double() - tf.alphas[cams].double()
        if w.rgb_l1 > 0:
            yield f"rgb_l1/{tf.step}", output.images[tf.row][cams].double() - tf.images[cams].double()
        if w.depth_l1 > 0 and tf.depths is not None and output.depths is not None:
            inside = (tf.alphas[cams] > 0.5).double()  # expected depth is defined where the target is opaque
            yield f"depth_l1/{tf.step}", inside * (output.depths[tf.row][cams].double() - tf.depths[cams].double())


def frozen_l1_signs(pipeline, output, targets) -> dict[str, torch.Tensor]:
    """Signs of every L1 residual at this output (for ``scene_loss(..., l1_signs=...)``)."""
    with torch.no_grad():
        return {key: torch.sign(residual) for key, residual in l1_residuals(pipeline, output, targets)}


def scene_loss(pipeline, output, params: dict[str, torch.Tensor], *, targets,
               l1_signs: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(total, terms): the scene's weighted loss and each weighted term's value.

    Image terms on every target frame, grid mass on the final state, regularisers on dFc. ``l1_signs`` (from
    ``frozen_l1_signs``) freezes the kinks of the L1 terms (gradcheck.py).
    """
    w = pipeline.scene.loss
    parts: dict[str, torch.Tensor] = {}

    def add(name, value):
        parts[name] = parts.get(name, 0.0) + value

    n_frames = len(targets.frames)
    signs = l1_signs or {}
    for key, residual in l1_residuals(pipeline, output, targets):
        name = key.split("/")[0]
        add(name, getattr(w, name) * l1(residual, signs.get(key)) / n_frames)
    for tf in targets.frames:
        cams = tf.cameras
        if w.silhouette > 0 and w.silhouette_kind == "bce":
            add("silhouette", w.silhouette * silhouette_loss(output.alphas[tf.row][cams], tf.alphas[cams], "bce")
                / n_frames)
        if w.dssim > 0:
            add("dssim", w.dssim * dssim_loss(output.images[tf.row][cams], tf.images[cams]) / n_frames)
    if w.grid_mass > 0 and pipeline.assets.target is not None:
        assets = pipeline.assets
        add("grid_mass", w.grid_mass * grid_mass_loss(
            output.result.x[-1], assets.source.masses.to(pipeline.device), assets.target_grid_mass, grid=assets.grid,
            bspline=pipeline.scene.sim.bspline))
    if w.volume > 0:
        add("volume", w.volume * volume_loss(output.result.F))
    dFc = params.get("dFc")
    if dFc is not None and w.dFc_l2 > 0:
        add("dFc_l2", w.dFc_l2 * (dFc.double() ** 2).mean())
    if dFc is not None and w.dFc_smooth > 0 and dFc.shape[0] > 1:
        add("dFc_smooth", w.dFc_smooth * ((dFc[1:] - dFc[:-1]).double() ** 2).mean())
    total = sum(parts.values(), torch.zeros((), dtype=torch.float64, device=pipeline.device))
    return total, {k: float(v.detach()) for k, v in parts.items()}
