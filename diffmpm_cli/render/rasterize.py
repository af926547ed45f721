"""Differentiable Gaussian-splat rasterisation shaped like gsplat's ``rasterization()`` (the torch <-> Warp boundary).

``rasterization(means, covars, opacities, colors, viewmats, Ks, width, height, ...)`` returns
``(colors [C, H, W, D'], alphas [C, H, W, 1], meta)`` with gsplat 1.5.3 semantics (kernels/splat.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import RenderCapacityError
from ..warp_runtime import torch_stream, warp, warp_device

RenderMode = Literal["RGB", "RGB+ED", "ED"]
TILE = 16
BLOCK = TILE * TILE  # threads per block of the GPU path (kernels/raster_block.py)


@contextlib.contextmanager
def cpu_blocks(wdev: str):
    """Run a tiled launch on the CPU with all its lanes (Warp's cooperative CPU blocks; the tests use it)."""
    wp = warp()
    saved = wp.config.enable_cpu_blocks
    wp.config.enable_cpu_blocks = saved or wdev == "cpu"
    try:
        yield
    finally:
        wp.config.enable_cpu_blocks = saved


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


def _intersections(wp, splat, *, means2d, radii, depths, C, N, tiles_x, tiles_y, wdev, capacity):
    """Sorted (camera tile | depth) keys with their (camera, Gaussian) indices and each tile's [start, end).

    Without ``capacity`` the count is read back to size the buffers (one host synchronisation). With it, nothing
    is read back (a CUDA graph can hold the whole render): the buffers hold ``capacity`` pairs, the unused tail
    sorts last, pairs past the capacity are dropped and the true count stays on the device for
    ``RasterMeta.check_capacity``.
    """
    tile_count = C * tiles_x * tiles_y
    counts = wp.empty(C * N, dtype=int, device=wdev)
    offsets = wp.empty(C * N, dtype=int, device=wdev)
    total = wp.zeros(1, dtype=int, device=wdev)
    starts = wp.zeros(tile_count, dtype=int, device=wdev)
    ends = wp.zeros(tile_count, dtype=int, device=wdev)
    if N:
        wp.launch(splat.count_tiles, dim=(C, N), device=wdev, inputs=[means2d, radii, tiles_x, tiles_y],
                  outputs=[counts])
        wp.utils.array_scan(counts, offsets, inclusive=False)
        wp.launch(splat.intersection_total, dim=1, device=wdev, inputs=[counts, offsets], outputs=[total])
    sorted_count = capacity if capacity is not None else int(total.numpy()[0])
    keys = wp.empty(2 * max(sorted_count, 1), dtype=wp.int64, device=wdev)
    values = wp.empty(2 * max(sorted_count, 1), dtype=int, device=wdev)
    if N and sorted_count:
        if capacity is not None:
            wp.launch(splat.pad_intersections, dim=capacity, device=wdev, inputs=[total, wp.int64(tile_count << 32)],
                      outputs=[keys, values])
        wp.launch(splat.emit_intersections, dim=(C, N), device=wdev,
                  inputs=[means2d, radii, depths, offsets, tiles_x, tiles_y, sorted_count], outputs=[keys, values])
        # only the bits in use: 32 of depth and enough for every (camera, tile) id and the padding's
        wp.utils.radix_sort_pairs(keys, values, sorted_count, end_bit=32 + tile_count.bit_length())
        wp.launch(splat.tile_ranges, dim=sorted_count, device=wdev, inputs=[keys, sorted_count, tile_count],
                  outputs=[starts, ends])
    return values, starts, ends, total


class _Rasterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, settings: dict, means, covars, colors, opacities, backgrounds, viewmats, Ks):
        wp = warp()
        from ..kernels import raster_block, splat

        device = means.device
        wdev = warp_device(device)
        C, N, D = colors.shape
        W, H = settings["width"], settings["height"]
        with_depth = int(settings["with_depth"])
        tiles_x, tiles_y = (W + TILE - 1) // TILE, (H + TILE - 1) // TILE
        path = settings["path"]

        def wrap(t, dtype=None, grad=False):
            t = t.detach().float().contiguous()
            return wp.from_torch(t, dtype=dtype, requires_grad=grad) if dtype else wp.from_torch(t, requires_grad=grad)

        with torch_stream(device):
            w_means = wrap(means, wp.vec3, True)
            w_covars = wrap(covars, wp.mat33, True)
            w_opac = wrap(opacities, grad=True)
            opac_c = wp.empty((C, N), dtype=float, device=wdev, requires_grad=True)  # per camera (antialiased)
            means2d = wp.empty((C, N), dtype=wp.vec2, device=wdev, requires_grad=True)
            conics = wp.empty((C, N), dtype=wp.vec3d, device=wdev, requires_grad=True)
            depths = wp.empty((C, N), dtype=float, device=wdev, requires_grad=True)
            radii = wp.empty((C, N), dtype=wp.vec2i, device=wdev)
            tape = wp.Tape()
            if N:
                with tape:
                    wp.launch(splat.project, dim=(C, N), device=wdev, inputs=[
                        w_means, w_covars, w_opac, wrap(viewmats, wp.mat44), wrap(Ks, wp.mat33), W, H,
                        settings["near"], settings["far"], settings["eps2d"], int(settings["antialiased"]),
                        settings["alpha_min"], settings["extend_max"]], outputs=[means2d, conics, depths, radii, opac_c])
            values, starts, ends, total = _intersections(
                wp, splat, means2d=means2d, radii=radii, depths=depths, C=C, N=N, tiles_x=tiles_x, tiles_y=tiles_y,
                wdev=wdev, capacity=settings["capacity"])
            channels = D + with_depth
            accumulates = D > 4 or path == "tile"  # these write the image with +=
            out_image = (torch.zeros if accumulates else torch.empty)(C * H * W, max(channels, 1), device=device)
            out_alpha = torch.empty(C * H * W, device=device)
            T_final = wp.empty(C * H * W, dtype=float, device=wdev)
            last = wp.empty(C * H * W, dtype=int, device=wdev)
            # per (camera, Gaussian), flattened c * N + g
            flat = dict(means2d=means2d.flatten(), conics=conics.flatten(), radii=radii.flatten(),
                        colors=wrap(colors.reshape(C * N, D) if D else torch.zeros(C * N, 1, device=device)),
                        opacities=opac_c.flatten(), depths=depths.flatten())
            if path == "block":
                flat["axes"] = wp.empty(C * N, dtype=wp.vec4, device=wdev)
                if N:
                    wp.launch(raster_block.conic_axes, dim=C * N, device=wdev, inputs=[flat["conics"]],
                              outputs=[flat["axes"]])
            common = dict(with_depth=with_depth, backgrounds=wrap(backgrounds if D else torch.zeros(C, 1, device=device)),
                          gaussian_count=C * N, alpha_min=settings["alpha_min"], t_stop=settings["t_stop"], values=values,
                          starts=starts)
            frame = [tiles_x, tiles_y, W, H, D]
            outputs = [wp.from_torch(out_image), wp.from_torch(out_alpha), T_final, last]
            if path == "block":
                with cpu_blocks(wdev):
                    wp.launch_tiled(raster_block.rasterize_forward_block, dim=C * tiles_y * tiles_x, block_dim=BLOCK,
                                    device=wdev, inputs=[
                                        flat["means2d"], flat["axes"], flat["colors"], flat["opacities"],
                                        flat["depths"], with_depth, common["backgrounds"], common["alpha_min"],
                                        common["t_stop"], values, starts, ends, *frame], outputs=outputs)
            else:
                kernel = splat.rasterize_forward if path == "pixel" else splat.rasterize_forward_tiles
                dim = (C, H, W) if path == "pixel" else (C, tiles_y, tiles_x)
                scratch = [] if path == "pixel" else [wp.zeros(C * H * W, dtype=int, device=wdev)]
                wp.launch(kernel, dim=dim, device=wdev, inputs=[*flat.values(), *common.values(), ends, *frame],
                          outputs=[*outputs, *scratch])
            out_image = out_image[:, :channels].reshape(C, H, W, channels)
            out_alpha = out_alpha.reshape(C, H, W, 1)
        ctx.saved = dict(tape=tape, w_means=w_means, w_covars=w_covars, w_opac=w_opac, opac_c=opac_c, means2d=means2d,
                         conics=conics, depths=depths, flat=flat, common=common, T_final=T_final, last=last,
                         shape=(C, N, D, H, W, tiles_x, tiles_y), channels=channels, device=device, path=path)
        meta = (wp.to_torch(means2d).clone(), wp.to_torch(depths).clone(), wp.to_torch(radii).clone(),
                wp.to_torch(total).reshape(()).clone())
        ctx.mark_non_differentiable(*meta)  # the meta is for inspection; gradients flow through the images
        return (out_image, out_alpha, *meta)

    @staticmethod
    def backward(ctx, v_image, v_alpha, *_):
        wp = warp()
        from ..kernels import raster_block, splat

        s, ctx.saved = ctx.saved, None
        C, N, D, H, W, tiles_x, tiles_y = s["shape"]
        device = s["device"]
        wdev = warp_device(device)
        with torch_stream(device):
            v_colors = torch.zeros(C * N, max(D, 1), device=device)
            v_opac = torch.zeros(N, device=device)
            v_opac_c = torch.zeros(C * N, device=device)  # per (camera, Gaussian), back through the projection
            v_bg = torch.zeros(C, max(D, 1), device=device)
            if N:
                if s["channels"]:
                    v_img = v_image.reshape(C * H * W, s["channels"]).float().contiguous()
                else:
                    v_img = torch.zeros(C * H * W, 1, device=device)
                flat, common = s["flat"], s["common"]
                cotangents = [tiles_x, tiles_y, W, H, D, s["T_final"], s["last"], wp.from_torch(v_img),
                              wp.from_torch(v_alpha.reshape(-1).float().contiguous())]
                if s["path"] == "block":
                    slots = torch.zeros(C * N, raster_block.SLOTS, device=device)
                    with cpu_blocks(wdev):
                        wp.launch_tiled(raster_block.rasterize_backward_block, dim=C * tiles_y * tiles_x,
                                        block_dim=BLOCK, device=wdev, inputs=[
                                            flat["means2d"], flat["axes"], flat["colors"], flat["opacities"],
                                            flat["depths"], *common.values(), *cotangents],
                                        outputs=[wp.from_torch(slots.reshape(-1)), wp.from_torch(v_colors.reshape(-1)),
                                                 wp.from_torch(v_bg)])
                    kept = min(D, 4)
                    v_colors[:, :kept] = slots[:, :kept]
                    v_means2d, v_conics, v_depths = slots[:, 4:6], slots[:, 6:9].double(), slots[:, 10]
                    v_opac_c = slots[:, 9].contiguous()
                else:
                    v_means2d = torch.zeros(C * N, 2, device=device)
                    v_conics = torch.zeros(C * N, 3, device=device, dtype=torch.float64)
                    v_depths = torch.zeros(C * N, device=device)
                    kernel = splat.rasterize_backward if s["path"] == "pixel" else splat.rasterize_backward_tiles
                    dim = (C, H, W) if s["path"] == "pixel" else (C, tiles_y, tiles_x)
                    scratch = [] if s["path"] == "pixel" else [wp.zeros(C * H * W, dtype=float, device=wdev)
                                                                for _ in range(3)]
                    wp.launch(kernel, dim=dim, device=wdev, inputs=[*flat.values(), *common.values(), *cotangents,
                                                                    *scratch],
                              outputs=[wp.from_torch(v_means2d, dtype=wp.vec2), wp.from_torch(v_conics, dtype=wp.vec3d),
                                       wp.from_torch(v_colors), wp.from_torch(v_opac_c), wp.from_torch(v_depths),
                                       wp.from_torch(v_bg)])
                s["tape"].backward(grads={
                    s["means2d"]: wp.from_torch(v_means2d.contiguous().reshape(C, N, 2), dtype=wp.vec2),
                    s["conics"]: wp.from_torch(v_conics.reshape(C, N, 3), dtype=wp.vec3d),
                    s["depths"]: wp.from_torch(v_depths.contiguous().reshape(C, N)),
                    s["opac_c"]: wp.from_torch(v_opac_c.reshape(C, N)),
                })
                v_opac = wp.to_torch(s["w_opac"].grad).clone()
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
                  eps2d: float = 0.3, rasterize_mode: Literal["classic", "antialiased"] = "classic",
                  path: Literal["auto", "block", "pixel", "tile"] = "auto", cutoffs: RasterCutoffs = GSPLAT,
                  capacity: int | None = None):
    """Render Gaussians from C cameras.

    means [N, 3] m, covars [N, 3, 3] m^2, opacities [N] in [0, 1], colors [N, D] or [C, N, D], viewmats [C, 4, 4]
    (world -> camera, OpenCV), Ks [C, 3, 3] px, backgrounds [C, D]. ``render_mode``: "RGB" (D channels), "RGB+ED"
    (D channels + expected depth), "ED" (expected depth only). Returns (colors [C, H, W, D'], alphas [C, H, W, 1],
    RasterMeta). Gradients reach means, covars, opacities, colors and backgrounds.

    ``path``: "block" (a 256-thread block per 16x16 tile with shared-memory batches and warp-reduced gradients;
    the CUDA path), "pixel" (one thread per pixel walking its tile's list from global memory), "tile" (one thread
    per tile, each Gaussian touching only the pixels of its box; the CPU path), "auto" picks "block" on CUDA and
    "tile" on the CPU. Same results.
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
    settings = dict(width=int(width), height=int(height), near=float(near_plane), far=float(far_plane),
                    eps2d=float(eps2d), antialiased=rasterize_mode == "antialiased", with_depth=with_depth, path=path,
                    alpha_min=float(cutoffs.alpha_min),
                    t_stop=float(cutoffs.t_stop), extend_max=float(cutoffs.extend_max),
                    capacity=None if capacity is None else int(capacity))
    image, alpha, means2d, depths, radii, total = _Rasterize.apply(settings, means, covars, colors, opacities,
                                                                 backgrounds, viewmats, Ks)
    if with_depth:
        expected = image[..., D:] / alpha.clamp_min(1e-10)
        image = torch.cat([image[..., :D], expected], dim=-1)
    meta = RasterMeta(radii=radii, means2d=means2d.reshape(C, N, 2), depths=depths.reshape(C, N),
                      intersection_count=int(total) if capacity is None else total,
                      tiles=((width + TILE - 1) // TILE, (height + TILE - 1) // TILE), capacity=settings["capacity"])
    return image, alpha, meta
