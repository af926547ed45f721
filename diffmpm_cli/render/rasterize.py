"""Differentiable Gaussian-splat rasterisation shaped like gsplat's ``rasterization()``.

``rasterization(means, covars, opacities, colors, viewmats, Ks, width, height, ...)`` returns
``(colors [C, H, W, D'], alphas [C, H, W, 1], meta)`` with gsplat 1.5.3 semantics (kernels/splat.py), composed of
the three ops of render/ops.py: project -> intersect -> composite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import RenderCapacityError
from .ops import RasterSettings, composite, intersect, project

RenderMode = Literal["RGB", "RGB+ED", "ED"]


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
        # t_stop stays above float32's smallest normal: the backward recovers each T by dividing the final T by
        # (1 - alpha) back to front, and a final T that underflowed (dozens of opaque layers, no stop) made those
        # divisions meaningless (measured: colour gradients 4-15x off on elastic_drop with 5000 surface Gaussians)
        return cls(alpha_min=alpha_min, t_stop=1e-20, extend_max=math.sqrt(2.0 * math.log(1.0 / alpha_min)))


GSPLAT = RasterCutoffs()


@dataclass
class RasterMeta:
    """radii [C, N, 2] px (0 = culled), means2d [C, N, 2] px, depths [C, N] m, intersection count, tile grid.

    ``intersection_count`` is an int, or with a fixed ``capacity`` a 0-d device tensor (nothing is read back then;
    ``check_capacity()`` does the read and raises if the buffers were too small).
    """

    radii: torch.Tensor
    means2d: torch.Tensor
    depths: torch.Tensor
    intersection_count: int | torch.Tensor
    tiles: tuple[int, int]
    capacity: int | None = None

    def check_capacity(self) -> int:
        """The intersection count; RenderCapacityError if it exceeded the fixed capacity (the image is then wrong)."""
        count = int(self.intersection_count)
        if self.capacity is not None and count > self.capacity:
            raise RenderCapacityError(f"the render needed {count:,} tile intersections but its buffers hold "
                                      f"{self.capacity:,}; raise the capacity (the image and gradients of this "
                                      "render are incomplete)")
        return count


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


def rasterization(means: torch.Tensor, covars: torch.Tensor, opacities: torch.Tensor, colors: torch.Tensor,
                  viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int, *, near_plane: float = 0.01,
                  far_plane: float = 1e10, backgrounds: torch.Tensor | None = None, render_mode: RenderMode = "RGB",
                  eps2d: float = 0.3, rasterize_mode: Literal["classic", "antialiased"] = "classic",
                  path: Literal["auto", "block", "tile"] = "auto", cutoffs: RasterCutoffs = GSPLAT,
                  capacity: int | None = None):
    """Render Gaussians from C cameras.

    means [N, 3] m, covars [N, 3, 3] m^2, opacities [N] in [0, 1], colors [N, D] or [C, N, D], viewmats [C, 4, 4]
    (world -> camera, OpenCV), Ks [C, 3, 3] px, backgrounds [C, D]. ``render_mode``: "RGB" (D channels), "RGB+ED"
    (D channels + expected depth), "ED" (expected depth only). Returns (colors [C, H, W, D'], alphas [C, H, W, 1],
    RasterMeta). Gradients reach means, covars, opacities, colors and backgrounds.

    ``path``: "block" (a 256-thread block per 16x16 tile with shared-memory batches and warp-reduced gradients;
    the CUDA path), "tile" (one thread per tile, each Gaussian touching only the pixels of its box; the CPU path),
    "auto" picks "block" on CUDA and "tile" on the CPU. Same results.
    ``rasterize_mode``: gsplat's. "classic" dilates every 2D footprint by eps2d (px^2); "antialiased" also scales
    each opacity per camera by sqrt(det Sigma_2D / det(Sigma_2D + eps2d I)), so footprints thinner than a pixel (a
    surface disc seen edge-on at a silhouette) keep their integrated opacity instead of growing a pixel-wide rim.
    ``cutoffs``: gsplat's by default (RasterCutoffs).
    ``capacity``: a fixed number of tile intersections to hold. Then nothing is read back to the host, so the
    forward and backward can be captured in one CUDA graph; call ``meta.check_capacity()`` afterwards.
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
        path = "block" if means.device.type == "cuda" else "tile"
    if path not in ("block", "tile"):
        raise ValueError(f"path must be 'auto', 'block' or 'tile', not {path!r}")
    settings = RasterSettings(width=int(width), height=int(height), near=float(near_plane), far=float(far_plane),
                              eps2d=float(eps2d), antialiased=rasterize_mode == "antialiased", with_depth=with_depth,
                              path=path, alpha_min=float(cutoffs.alpha_min), t_stop=float(cutoffs.t_stop),
                              extend_max=float(cutoffs.extend_max),
                              capacity=None if capacity is None else int(capacity))
    means2d, conics, depths, radii, opacities_c = project(means, covars, opacities, viewmats, Ks, settings)
    isect = intersect(means2d, radii, depths, settings)
    image, alpha = composite(means2d, conics, radii, colors, opacities_c, depths, backgrounds, isect, settings)
    if with_depth:
        expected = image[..., D:] / alpha.clamp_min(1e-10)
        image = torch.cat([image[..., :D], expected], dim=-1)
    # the meta is for inspection (copies, not differentiable); gradients flow through the images
    meta = RasterMeta(radii=radii.clone(), means2d=means2d.detach().clone(), depths=depths.detach().clone(),
                      intersection_count=isect.sorted_count if capacity is None else isect.count.reshape(()),
                      tiles=settings.tiles, capacity=settings.capacity)
    return image, alpha, meta
