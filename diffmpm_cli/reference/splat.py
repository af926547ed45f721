"""Slow, obvious float64 twin of the rasteriser: every Gaussian at every pixel, gsplat 1.5.3 semantics."""

from __future__ import annotations

import math

import torch

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_STOP = 1e-4
EXTEND_MAX = 3.33


def project_ref(means, covars, opacities, viewmats, Ks, width: int, height: int, near: float, far: float,
                eps2d: float = 0.3, alpha_min: float = ALPHA_MIN, extend_max: float = EXTEND_MAX,
                antialiased: bool = False, with_opacities: bool = False):
    """means2d [C, N, 2], conics [C, N, 3] (inverse 2D covariance a, b, c), depths [C, N], radii [C, N, 2]; with
    ``with_opacities`` also the opacities [C, N] compositing uses (``antialiased``: times
    sqrt(det Sigma_2D / det(Sigma_2D + eps2d I)))."""
    R, t = viewmats[:, None, :3, :3], viewmats[:, None, :3, 3]
    pc = (R @ means[None, :, :, None])[..., 0] + t
    x, y, z = pc.unbind(-1)
    fx, fy = Ks[:, None, 0, 0], Ks[:, None, 1, 1]
    cx, cy = Ks[:, None, 0, 2], Ks[:, None, 1, 2]
    cov_c = R @ covars[None] @ R.transpose(-1, -2)
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    tx = z * torch.clamp(x / z, -(cx / fx + 0.3 * tan_x), (width - cx) / fx + 0.3 * tan_x)
    ty = z * torch.clamp(y / z, -(cy / fy + 0.3 * tan_y), (height - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(z)
    J = torch.stack([torch.stack([fx / z, zero, -fx * tx / z**2], -1),
                     torch.stack([zero, fy / z, -fy * ty / z**2], -1)], -2)
    cov2 = J @ cov_c @ J.transpose(-1, -2) + eps2d * torch.eye(2, dtype=means.dtype)
    a, b, d = cov2[..., 0, 0], cov2[..., 0, 1], cov2[..., 1, 1]
    det = a * d - b * b
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
    opac = opacities[None].expand_as(z)
    if antialiased:
        raw = (a - eps2d) * (d - eps2d) - b * b
        positive = (raw > 0) & (det > 0)
        ratio = torch.where(positive, raw, torch.ones_like(raw)) / torch.where(positive, det, torch.ones_like(det))
        opac = torch.where(positive, opac * torch.sqrt(ratio), torch.zeros_like(opac))
    with torch.no_grad():  # culling and box radii are not differentiable
        o = opac
        ok = (z >= near) & (z <= far) & (det > 0) & (o >= alpha_min)
        extend = torch.clamp(torch.sqrt(2 * torch.log(torch.clamp(o, min=alpha_min) / alpha_min)), max=extend_max)
        rx = torch.ceil(extend * torch.sqrt(torch.clamp(a, min=0)))
        ry = torch.ceil(extend * torch.sqrt(torch.clamp(d, min=0)))
        mx, my = means2d.unbind(-1)
        ok = ok & ((rx > 0) | (ry > 0)) & (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
    safe_det = torch.where(ok, det, torch.ones_like(det))
    conics = torch.stack([d / safe_det, -b / safe_det, a / safe_det], -1)
    radii = torch.where(ok[..., None], torch.stack([rx, ry], -1), torch.zeros_like(means2d)).long()
    if with_opacities:
        return means2d, conics, z, radii, opac
    return means2d, conics, z, radii


def rasterize_ref(means, covars, opacities, colors, viewmats, Ks, width: int, height: int, *, near: float = 0.01,
                  far: float = 1e10, backgrounds=None, render_mode: str = "RGB", eps2d: float = 0.3,
                  rasterize_mode: str = "classic", return_ambiguous: bool = False, band: float = 1e-5,
                  alpha_min: float = ALPHA_MIN, t_stop: float = T_STOP, extend_max: float = EXTEND_MAX):
    """(colors [C, H, W, D'], alphas [C, H, W, 1]) composited front to back over all pixels, in float64.

    With ``return_ambiguous`` also a mask [C, H, W] of pixels where a Gaussian sits within ``band`` (relative) of
    a discontinuity (alpha = 1/255 skip, T = 1e-4 stop): float32 kernels may decide those either way.
    """
    C, N = viewmats.shape[0], means.shape[0]
    if colors.dim() == 2:
        colors = colors.expand(C, N, colors.shape[-1])
    means2d, conics, depths, radii, opac = project_ref(means, covars, opacities, viewmats, Ks, width, height, near,
                                                       far, eps2d, alpha_min, extend_max,
                                                       antialiased=rasterize_mode == "antialiased", with_opacities=True)
    with_depth = render_mode in ("RGB+ED", "ED")
    if render_mode == "ED":
        colors = colors[..., :0]
    D = colors.shape[-1]
    jj, ii = torch.meshgrid(torch.arange(width, dtype=means.dtype) + 0.5, torch.arange(height, dtype=means.dtype) + 0.5,
                            indexing="xy")
    px, py = jj.reshape(-1), ii.reshape(-1)
    images, alphas, ambiguous = [], [], []
    for c in range(C):
        valid = (radii[c] > 0).any(-1)
        order = [int(g) for g in torch.argsort(depths[c], stable=True) if valid[g]]
        T = torch.ones(px.shape[0], dtype=means.dtype)
        done = torch.zeros(px.shape[0], dtype=torch.bool)
        unsure = torch.zeros(px.shape[0], dtype=torch.bool)
        image = torch.zeros(px.shape[0], D + int(with_depth), dtype=means.dtype)
        for g in order:
            dx, dy = means2d[c, g, 0] - px, means2d[c, g, 1] - py
            ca, cb, cc = conics[c, g]
            sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
            alpha = torch.clamp(opac[c, g] * torch.exp(-sigma), max=ALPHA_MAX)
            hit = (sigma >= 0) & (alpha >= alpha_min) & ~done
            next_T = T * (1 - alpha)
            with torch.no_grad():
                near_skip = (alpha - alpha_min).abs() <= band * alpha_min
                near_stop = (next_T - t_stop).abs() <= band * 10 * t_stop
                unsure |= ~done & (sigma >= -band) & (near_skip | (near_stop & (alpha >= alpha_min)))
            stop = hit & (next_T <= t_stop)
            done = done | stop
            hit = hit & ~stop
            feature = colors[c, g]
            if with_depth:
                feature = torch.cat([feature, depths[c, g][None]])
            image = image + torch.where(hit[:, None], (alpha * T)[:, None] * feature[None], torch.zeros_like(image))
            T = torch.where(hit, next_T, T)
        if backgrounds is not None and D:
            image = torch.cat([image[:, :D] + T[:, None] * backgrounds[c][None], image[:, D:]], dim=1)
        alpha_img = (1 - T)[:, None]
        if with_depth:
            image = torch.cat([image[:, :D], image[:, D:] / torch.clamp(alpha_img, min=1e-10)], dim=1)
        images.append(image.reshape(height, width, -1))
        alphas.append(alpha_img.reshape(height, width, 1))
        ambiguous.append(unsure.reshape(height, width))
    if return_ambiguous:
        return torch.stack(images), torch.stack(alphas), torch.stack(ambiguous)
    return torch.stack(images), torch.stack(alphas)


def intersection_count_ref(means2d, radii, width: int, height: int, tile: int = 16) -> int:
    """Number of (camera, tile, Gaussian) pairs gsplat's isect_tiles emits for these boxes."""
    tiles_x, tiles_y = (width + tile - 1) // tile, (height + tile - 1) // tile
    valid = (radii > 0).any(-1)
    tx, ty = means2d[..., 0] / tile, means2d[..., 1] / tile
    rx, ry = radii[..., 0] / tile, radii[..., 1] / tile
    x0 = torch.clamp(torch.floor(tx - rx), 0, tiles_x)
    x1 = torch.clamp(torch.ceil(tx + rx), 0, tiles_x)
    y0 = torch.clamp(torch.floor(ty - ry), 0, tiles_y)
    y1 = torch.clamp(torch.ceil(ty + ry), 0, tiles_y)
    return int(torch.where(valid, (x1 - x0) * (y1 - y0), torch.zeros_like(x0)).sum())


def random_gaussians(count: int, *, seed: int = 0, dtype=torch.float64):
    """A mixed test population: overlapping, off-screen, behind-camera, needle-thin, huge, near-opaque Gaussians."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(count, 3, generator=g, dtype=dtype) * 0.35
    scales = torch.exp(torch.randn(count, 3, generator=g, dtype=dtype) * 0.5 - 3.2)
    q = torch.randn(count, 4, generator=g, dtype=dtype)
    opac = torch.rand(count, generator=g, dtype=dtype)
    k = count // 10
    means[:k, 0] += 3.0  # off-screen to the side
    means[k:2 * k, 2] += 4.0  # behind the camera (camera at z = +2.5 looking at -z)
    scales[2 * k:3 * k, 0] *= 30.0  # needle-thin: one long axis, two thin ones
    scales[2 * k:3 * k, 1:] *= 0.05
    scales[3 * k:3 * k + 5] *= 12.0  # huge
    opac[4 * k:5 * k] = 0.995  # near-opaque
    from ..render.rasterize import covars_from_quats_scales

    covars = covars_from_quats_scales(q, scales)
    colors = torch.rand(count, 3, generator=g, dtype=dtype)
    return means, covars, opac, colors


def orbit_cameras(count: int, width: int, height: int, *, radius: float = 2.5, fov: float = 40.0,
                  dtype=torch.float64):
    """viewmats [C, 4, 4] and Ks [C, 3, 3] of cameras on a circle around the origin (azimuth 0 looks down -z)."""
    from ..render.camera import intrinsics_from_fov, look_at

    views, Ks = [], []
    for i in range(count):
        az = 2 * math.pi * i / count
        eye = [radius * math.sin(az), 0.3, radius * math.cos(az)]
        views.append(torch.tensor(look_at(eye, [0, 0, 0], [0, 1, 0]), dtype=dtype))
        Ks.append(torch.tensor(intrinsics_from_fov(fov, width, height), dtype=dtype))
    return torch.stack(views), torch.stack(Ks)
