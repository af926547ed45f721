"""Differentiable Gaussian-splat rasterisation shaped like gsplat's ``rasterization()`` (the torch <-> Warp boundary).

``rasterization(means, covars, opacities, colors, viewmats, Ks, width, height, ...)`` returns
``(colors [C, H, W, D'], alphas [C, H, W, 1], meta)`` with gsplat 1.5.3 semantics (kernels/splat.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..warp_runtime import torch_stream, warp, warp_device

RenderMode = Literal["RGB", "RGB+ED", "ED"]
TILE = 16


@dataclass(frozen=True)
class RasterCutoffs:
    """Where compositing stops looking: alpha below ``alpha_min`` is skipped (and opacity below it culled), a pixel
    stops before its transmittance would fall to ``t_stop``, boxes reach ``extend_max`` standard deviations.

    The defaults are gsplat 1.5.3's. Each cut-off makes the image jump (by up to alpha_min) when a Gaussian crosses
    it, so central differences of a loss do not converge to its gradient; ``RasterCutoffs.smooth()`` moves them
    where the jumps are ~1e-9 and is what the gradient checker renders with. Forward and backward code are the same.
    """

    alpha_min: float = 1.0 / 255.0
    t_stop: float = 1e-4
    extend_max: float = 3.33

    @classmethod
    def smooth(cls, alpha_min: float = 1e-9) -> RasterCutoffs:
        return cls(alpha_min=alpha_min, t_stop=0.0, extend_max=math.sqrt(2.0 * math.log(1.0 / alpha_min)))


GSPLAT = RasterCutoffs()


@dataclass
class RasterMeta:
    """radii [C, N, 2] px (0 = culled), means2d [C, N, 2] px, depths [C, N] m, intersection count, tile grid."""

    radii: torch.Tensor
    means2d: torch.Tensor
    depths: torch.Tensor
    intersection_count: int
    tiles: tuple[int, int]


def raster_memory(*, gaussians: int, cameras: int, width: int, height: int, tiles_per_gaussian: float = 4.0) -> int:
    """Bytes one differentiable render keeps until its backward (float32, RGB), an estimate.

    Per (camera, Gaussian) the projection and its adjoint (means2d, conics in float64, depths, radii, tile counts
    and offsets, colours: ~120 B); per intersection a 64-bit key and a 32-bit value, doubled for the radix sort
    (``tiles_per_gaussian`` of them per Gaussian, ~4 for Gaussians of a few pixels); per pixel the image, alpha,
    final transmittance, last index and the backward's cotangents and scratch (~64 B).
    """
    per_gaussian = 120 * cameras * gaussians
    intersections = int(2 * 12 * tiles_per_gaussian * cameras * gaussians)
    per_pixel = 64 * cameras * width * height
    return per_gaussian + intersections + per_pixel


def covars_from_quats_scales(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Sigma = R diag(s^2) R^T from quaternions [N, 4] (w, x, y, z; normalised here) and scales [N, 3]."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    R = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*quats.shape[:-1], 3, 3)
    M = R * scales[..., None, :]
    return M @ M.transpose(-1, -2)


class _Rasterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, settings: dict, means, covars, colors, opacities, backgrounds, viewmats, Ks):
        wp = warp()
        from ..kernels import splat

        device = means.device
        wdev = warp_device(device)
        C, N, D = colors.shape
        W, H = settings["width"], settings["height"]
        with_depth = int(settings["with_depth"])
        tiles_x, tiles_y = (W + TILE - 1) // TILE, (H + TILE - 1) // TILE

        def wrap(t, dtype=None, grad=False):
            t = t.detach().float().contiguous()
            return wp.from_torch(t, dtype=dtype, requires_grad=grad) if dtype else wp.from_torch(t, requires_grad=grad)

        with torch_stream(device):
            w_means = wrap(means, wp.vec3, True)
            w_covars = wrap(covars, wp.mat33, True)
            w_opac = wrap(opacities)
            w_view = wrap(viewmats, wp.mat44)
            w_K = wrap(Ks, wp.mat33)
            means2d = wp.zeros((C, N), dtype=wp.vec2, device=wdev, requires_grad=True)
            conics = wp.zeros((C, N), dtype=wp.vec3d, device=wdev, requires_grad=True)
            depths = wp.zeros((C, N), dtype=float, device=wdev, requires_grad=True)
            radii = wp.zeros((C, N), dtype=wp.vec2i, device=wdev)
            tape = wp.Tape()
            with tape:
                if N:
                    wp.launch(splat.project, dim=(C, N), device=wdev, inputs=[
                        w_means, w_covars, w_opac, w_view, w_K, W, H, settings["near"], settings["far"],
                        settings["eps2d"], settings["alpha_min"], settings["extend_max"]],
                        outputs=[means2d, conics, depths, radii])
            # intersections: count, scan, emit, sort, ranges
            counts = wp.zeros(C * N, dtype=int, device=wdev)
            offsets = wp.zeros(C * N, dtype=int, device=wdev)
            total = 0
            if N:
                wp.launch(splat.count_tiles, dim=(C, N), device=wdev, inputs=[means2d, radii, tiles_x, tiles_y],
                          outputs=[counts])
                wp.utils.array_scan(counts, offsets, inclusive=False)
                total = int(wp.to_torch(offsets)[-1] + wp.to_torch(counts)[-1])
            keys = wp.zeros(2 * max(total, 1), dtype=wp.int64, device=wdev)
            values = wp.zeros(2 * max(total, 1), dtype=int, device=wdev)
            starts = wp.zeros(C * tiles_x * tiles_y, dtype=int, device=wdev)
            ends = wp.zeros(C * tiles_x * tiles_y, dtype=int, device=wdev)
            if total:
                wp.launch(splat.emit_intersections, dim=(C, N), device=wdev,
                          inputs=[means2d, radii, depths, offsets, tiles_x, tiles_y], outputs=[keys, values])
                wp.utils.radix_sort_pairs(keys, values, total)
                wp.launch(splat.tile_ranges, dim=total, device=wdev, inputs=[keys, total], outputs=[starts, ends])
            flat_colors = wrap(colors.reshape(C * N, D) if D else torch.zeros(C * N, 1, device=device))
            w_bg = wrap(backgrounds if D else torch.zeros(C, 1, device=device))
            channels = D + with_depth
            image = wp.zeros((C * H * W, max(channels, 1)), dtype=float, device=wdev)
            alpha = wp.zeros(C * H * W, dtype=float, device=wdev)
            T_final = wp.zeros(C * H * W, dtype=float, device=wdev)
            last = wp.zeros(C * H * W, dtype=int, device=wdev)
            raster_common = [means2d.flatten(), conics.flatten(), radii.flatten(), flat_colors, w_opac,
                             depths.flatten(), with_depth, w_bg, N, settings["alpha_min"], settings["t_stop"], values,
                             starts]
            per_pixel = settings["path"] == "pixel"
            if per_pixel:
                wp.launch(splat.rasterize_forward, dim=(C, H, W), device=wdev,
                          inputs=[*raster_common, ends, tiles_x, tiles_y, W, H, D],
                          outputs=[image, alpha, T_final, last])
            else:
                wp.launch(splat.rasterize_forward_tiles, dim=(C, tiles_y, tiles_x), device=wdev,
                          inputs=[*raster_common, ends, tiles_x, tiles_y, W, H, D],
                          outputs=[image, alpha, T_final, last, wp.zeros(C * H * W, dtype=int, device=wdev)])
            out_image = wp.to_torch(image)[:, :channels].reshape(C, H, W, channels).clone()
            out_alpha = wp.to_torch(alpha).reshape(C, H, W, 1).clone()
        ctx.saved = dict(tape=tape, w_means=w_means, w_covars=w_covars, means2d=means2d, conics=conics, depths=depths,
                         raster_common=raster_common, T_final=T_final, last=last, shape=(C, N, D, H, W, tiles_x, tiles_y),
                         channels=channels, device=device, per_pixel=per_pixel)
        meta = (wp.to_torch(means2d).clone(), wp.to_torch(depths).clone(), wp.to_torch(radii).clone(),
                torch.tensor(total))
        ctx.mark_non_differentiable(*meta)  # the meta is for inspection; gradients flow through the images
        return (out_image, out_alpha, *meta)

    @staticmethod
    def backward(ctx, v_image, v_alpha, *_):
        wp = warp()
        from ..kernels import splat

        s, ctx.saved = ctx.saved, None
        C, N, D, H, W, tiles_x, tiles_y = s["shape"]
        device = s["device"]
        wdev = warp_device(device)
        with torch_stream(device):
            v_img = torch.zeros(C * H * W, max(s["channels"], 1), device=device)
            v_img[:, : s["channels"]] = v_image.reshape(C * H * W, s["channels"]).float()
            v_means2d = torch.zeros(C * N, 2, device=device)
            v_conics = torch.zeros(C * N, 3, device=device, dtype=torch.float64)
            v_colors = torch.zeros(C * N, max(D, 1), device=device)
            v_opac = torch.zeros(N, device=device)
            v_depths = torch.zeros(C * N, device=device)
            v_bg = torch.zeros(C, max(D, 1), device=device)
            if N:
                inputs = [*s["raster_common"], tiles_x, tiles_y, W, H, D, s["T_final"], s["last"],
                          wp.from_torch(v_img), wp.from_torch(v_alpha.reshape(-1).float().contiguous())]
                outputs = [wp.from_torch(v_means2d, dtype=wp.vec2), wp.from_torch(v_conics, dtype=wp.vec3d),
                           wp.from_torch(v_colors), wp.from_torch(v_opac), wp.from_torch(v_depths), wp.from_torch(v_bg)]
                if s["per_pixel"]:
                    wp.launch(splat.rasterize_backward, dim=(C, H, W), device=wdev, inputs=inputs, outputs=outputs)
                else:
                    scratch = [wp.zeros(C * H * W, dtype=float, device=wdev) for _ in range(3)]
                    wp.launch(splat.rasterize_backward_tiles, dim=(C, tiles_y, tiles_x), device=wdev,
                              inputs=[*inputs, *scratch], outputs=outputs)
                s["tape"].backward(grads={
                    s["means2d"]: wp.from_torch(v_means2d.reshape(C, N, 2), dtype=wp.vec2),
                    s["conics"]: wp.from_torch(v_conics.reshape(C, N, 3), dtype=wp.vec3d),
                    s["depths"]: wp.from_torch(v_depths.reshape(C, N)),
                })
                v_means = wp.to_torch(s["w_means"].grad).clone()
                v_covars = wp.to_torch(s["w_covars"].grad).clone()
                v_covars = 0.5 * (v_covars + v_covars.transpose(1, 2))  # covariances are symmetric (as gsplat)
            else:
                v_means = torch.zeros(0, 3, device=device)
                v_covars = torch.zeros(0, 3, 3, device=device)
        return (None, v_means, v_covars, v_colors[:, :D].reshape(C, N, D), v_opac, v_bg[:, :D], None, None)


def rasterization(means: torch.Tensor, covars: torch.Tensor, opacities: torch.Tensor, colors: torch.Tensor,
                  viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int, *, near_plane: float = 0.01,
                  far_plane: float = 1e10, backgrounds: torch.Tensor | None = None, render_mode: RenderMode = "RGB",
                  eps2d: float = 0.3, path: Literal["auto", "pixel", "tile"] = "auto",
                  cutoffs: RasterCutoffs = GSPLAT):
    """Render Gaussians from C cameras.

    means [N, 3] m, covars [N, 3, 3] m^2, opacities [N] in [0, 1], colors [N, D] or [C, N, D], viewmats [C, 4, 4]
    (world -> camera, OpenCV), Ks [C, 3, 3] px, backgrounds [C, D]. ``render_mode``: "RGB" (D channels), "RGB+ED"
    (D channels + expected depth), "ED" (expected depth only). Returns (colors [C, H, W, D'], alphas [C, H, W, 1],
    RasterMeta). Gradients reach means, covars, opacities, colors and backgrounds.

    ``path``: "pixel" (one thread per pixel walking its tile's list; the CUDA path), "tile" (one thread per tile,
    each Gaussian touching only the pixels of its box; the CPU path), "auto" picks by device. Same results.
    ``cutoffs``: gsplat's by default (RasterCutoffs).
    """
    C, N = viewmats.shape[0], means.shape[0]
    if colors.dim() == 2:
        colors = colors.expand(C, N, colors.shape[-1])
    with_depth = render_mode in ("RGB+ED", "ED")
    if render_mode == "ED":
        colors = colors[..., :0]
    D = colors.shape[-1]
    if backgrounds is None:
        backgrounds = torch.zeros(C, D, device=means.device)
    if path == "auto":
        path = "pixel" if means.device.type == "cuda" else "tile"
    settings = dict(width=int(width), height=int(height), near=float(near_plane), far=float(far_plane),
                    eps2d=float(eps2d), with_depth=with_depth, path=path, alpha_min=float(cutoffs.alpha_min),
                    t_stop=float(cutoffs.t_stop), extend_max=float(cutoffs.extend_max))
    image, alpha, means2d, depths, radii, total = _Rasterize.apply(settings, means, covars, colors, opacities,
                                                                 backgrounds, viewmats, Ks)
    if with_depth:
        expected = image[..., D:] / alpha.clamp_min(1e-10)
        image = torch.cat([image[..., :D], expected], dim=-1)
    meta = RasterMeta(radii=radii, means2d=means2d.reshape(C, N, 2), depths=depths.reshape(C, N),
                      intersection_count=int(total), tiles=((width + TILE - 1) // TILE, (height + TILE - 1) // TILE))
    return image, alpha, meta
