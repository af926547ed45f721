"""The rasteriser's three ops, each one torch <-> Warp boundary, composed by ``rasterization()`` as gsplat composes
``fully_fused_projection`` -> ``isect_tiles`` -> ``rasterize_to_pixels``:

- ``project``: Gaussians -> per (camera, Gaussian) 2D means, conics, depths, radii, opacities. Differentiable by
  Warp's generated adjoint of the ``project`` kernel, launched in the backward from the saved tensors.
- ``intersect``: the depth-sorted (camera, tile, Gaussian) intersections and each tile's range. Not differentiable.
- ``composite``: front-to-back compositing into images and alphas, with the hand-written adjoint (Warp's tape
  cannot replay the compositing loop). Two paths: ``block`` (CUDA) and ``tile`` (the CPU).

Every kernel argument is named at its launch (``launch``). Tensors that a backward reads are kept with
``ctx.save_for_backward``, so torch's in-place checks cover them, torch raises its own error on a second backward
without ``retain_graph``, and with ``retain_graph`` a second backward recomputes the same gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from ..warp_runtime import torch_stream, warp, warp_device

TILE = 16
BLOCK = TILE * TILE  # threads per block of the CUDA path (kernels/raster_block.py)
RasterPath = Literal["block", "tile"]


@dataclass(frozen=True)
class RasterSettings:
    """What one render is asked for (everything but the tensors): image size, projection, compositing path and
    cut-offs (RasterCutoffs), an optional fixed intersection capacity."""

    width: int
    height: int
    near: float
    far: float
    eps2d: float
    antialiased: bool
    with_depth: bool
    path: RasterPath
    alpha_min: float
    t_stop: float
    extend_max: float
    capacity: int | None = None

    @property
    def tiles(self) -> tuple[int, int]:
        """(tiles_x, tiles_y) of 16x16 pixels."""
        return (self.width + TILE - 1) // TILE, (self.height + TILE - 1) // TILE


@dataclass(frozen=True)
class Intersections:
    """Sorted tile intersections (``intersect``): ``gaussian_ids`` (camera, Gaussian) index c * N + g of each, in
    order of (camera tile, depth) (a buffer of 2 * max(count, 1) for the radix sort; the first ``count`` are
    used); ``tile_starts``/``tile_ends`` each (camera, tile)'s [start, end); ``count`` the number of intersections
    (a 1-element int32 tensor on the device; with a fixed capacity it may exceed the capacity); ``sorted_count``
    the pairs sorted: the count read back, or the fixed capacity."""

    gaussian_ids: torch.Tensor
    tile_starts: torch.Tensor
    tile_ends: torch.Tensor
    count: torch.Tensor
    sorted_count: int


# ----------------------------------------------------------------------------------------------------------------
# launching with named arguments

_PARAMETERS: dict = {}


def _parameters(kernel) -> tuple[str, ...]:
    if kernel not in _PARAMETERS:
        _PARAMETERS[kernel] = tuple(arg.label for arg in kernel.adj.args)
    return _PARAMETERS[kernel]


def launch(kernel, *, dim, device: str, block_dim: int | None = None, adjoint: dict | None = None, **arguments):
    """``wp.launch`` with every kernel argument named; the names must be exactly the kernel's parameters (a missing,
    extra or misspelt name raises TypeError, so two arguments of one type cannot swap silently).

    ``adjoint``: launch the kernel's generated adjoint instead, with these arrays (by parameter name) as the
    adjoints of the arrays of the same name (read for outputs, accumulated into for inputs); the rest get none.
    ``block_dim``: a tiled launch of ``dim`` blocks of ``block_dim`` threads. Never recorded on a tape.
    """
    wp = warp()
    names = _parameters(kernel)
    if set(arguments) != set(names):
        missing = [n for n in names if n not in arguments]
        extra = [n for n in arguments if n not in names]
        raise TypeError(f"launch of {kernel.key}: missing {missing}, unexpected {extra}")
    values = [arguments[n] for n in names]
    adj = [] if adjoint is None else [adjoint.get(n) for n in names]
    if adjoint is not None and set(adjoint) - set(names):
        raise TypeError(f"adjoint launch of {kernel.key}: unexpected {sorted(set(adjoint) - set(names))}")
    if block_dim is not None:
        wp.launch_tiled(kernel, dim=dim, inputs=values, device=device, block_dim=block_dim, record_tape=False)
    else:
        wp.launch(kernel, dim=dim, inputs=values, adj_inputs=adj, device=device, adjoint=adjoint is not None,
                  record_tape=False)


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


def _wrap(t: torch.Tensor, dtype=None, *, ctype: bool = True):
    """A Warp view of a contiguous torch tensor (no gradient buffer: adjoints are passed explicitly). ``ctype``:
    Warp's bare array descriptor, which kernel launches take as they take an array at a fraction of the host cost
    of building a ``wp.array`` (a struct field or a Warp utility needs the array: ``ctype=False``)."""
    wp = warp()
    t = t.detach()
    return wp.from_torch(t, dtype=dtype, requires_grad=False, return_ctype=ctype)


# ----------------------------------------------------------------------------------------------------------------
# project


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, covars, opacities, viewmats, Ks, settings: RasterSettings):
        from ..kernels import splat

        device = means.device
        C, N = viewmats.shape[0], means.shape[0]
        inputs = [t.float().contiguous() for t in (means, covars, opacities, viewmats, Ks)]
        means2d = torch.empty(C, N, 2, device=device)
        conics = torch.empty(C, N, 3, device=device, dtype=torch.float64)
        depths = torch.empty(C, N, device=device)
        radii = torch.empty(C, N, 2, device=device, dtype=torch.int32)
        opacities_c = torch.empty(C, N, device=device)  # per camera (scaled in "antialiased" mode)
        outputs = (means2d, conics, depths, radii, opacities_c)
        # the Warp views of the saved tensors, built once: the backward launches with them again (an eager render
        # is host-bound, BENCHMARKS.md, and each view costs a from_torch)
        ctx.arguments = _project_arguments(settings, *inputs, *outputs)
        if N:
            with torch_stream(device):
                launch(splat.project, dim=(C, N), device=warp_device(device), **ctx.arguments)
        ctx.save_for_backward(*inputs, *outputs)
        ctx.mark_non_differentiable(radii)
        return outputs

    @staticmethod
    def backward(ctx, v_means2d, v_conics, v_depths, _v_radii, v_opacities_c):
        from ..kernels import splat

        means, covars, opacities, viewmats = ctx.saved_tensors[:4]  # (torch's checks: none changed in place)
        C, N = viewmats.shape[0], means.shape[0]
        v_means = torch.zeros_like(means)
        v_covars = torch.zeros_like(covars)
        v_opacities = torch.zeros_like(opacities)
        if N:
            wp = warp()
            with torch_stream(means.device):
                launch(splat.project, dim=(C, N), device=warp_device(means.device),
                       adjoint=dict(means=_wrap(v_means, wp.vec3), covars=_wrap(v_covars, wp.mat33),
                                    opacities=_wrap(v_opacities),
                                    means2d=_wrap(v_means2d.float().contiguous(), wp.vec2),
                                    conics=_wrap(v_conics.double().contiguous(), wp.vec3d),
                                    depths=_wrap(v_depths.float().contiguous()),
                                    opacities_out=_wrap(v_opacities_c.float().contiguous())),
                       **ctx.arguments)
            v_covars = 0.5 * (v_covars + v_covars.transpose(1, 2))  # covariances are symmetric (as gsplat)
        return v_means, v_covars, v_opacities, None, None, None


def _project_arguments(s: RasterSettings, means, covars, opacities, viewmats, Ks, means2d, conics, depths, radii,
                       opacities_c) -> dict:
    wp = warp()
    return dict(means=_wrap(means, wp.vec3), covars=_wrap(covars, wp.mat33), opacities=_wrap(opacities),
                viewmats=_wrap(viewmats, wp.mat44), Ks=_wrap(Ks, wp.mat33), width=s.width, height=s.height,
                near=s.near, far=s.far, eps2d=s.eps2d, antialiased=int(s.antialiased), alpha_min=s.alpha_min,
                extend_max=s.extend_max, means2d=_wrap(means2d, wp.vec2), conics=_wrap(conics, wp.vec3d),
                depths=_wrap(depths), radii=_wrap(radii, wp.vec2i), opacities_out=_wrap(opacities_c))


def project(means, covars, opacities, viewmats, Ks, settings: RasterSettings):
    """means [N, 3] m, covars [N, 3, 3] m^2, opacities [N], viewmats [C, 4, 4], Ks [C, 3, 3] -> means2d [C, N, 2]
    px, conics [C, N, 3] (float64, the inverse 2D covariance's a, b, c; 0 where culled), depths [C, N] m, radii
    [C, N, 2] int32 px (0 = culled; not differentiable), opacities [C, N] (per camera). Gradients reach means,
    covars (symmetrised) and opacities."""
    return _Project.apply(means, covars, opacities, viewmats, Ks, settings)


# ----------------------------------------------------------------------------------------------------------------
# intersect


@torch.no_grad()
def intersect(means2d, radii, depths, settings: RasterSettings) -> Intersections:
    """The (camera tile | depth)-sorted intersections of every projected Gaussian's box with the 16x16 tiles.

    Without ``settings.capacity`` the count is read back to size the buffers (one host synchronisation). With it,
    nothing is read back (a CUDA graph can hold the whole render): the buffers hold ``capacity`` pairs, the unused
    tail sorts last, pairs past the capacity are dropped and the true count stays on the device for
    ``RasterMeta.check_capacity``.
    """
    wp = warp()
    from ..kernels import splat

    device = means2d.device
    wdev = warp_device(device)
    C, N = radii.shape[:2]
    tiles_x, tiles_y = settings.tiles
    tile_count = C * tiles_x * tiles_y
    capacity = settings.capacity
    w_means2d = _wrap(means2d.contiguous(), wp.vec2)
    w_radii = _wrap(radii.contiguous(), wp.vec2i)
    with torch_stream(device):
        counts = torch.empty(C * N, device=device, dtype=torch.int32)
        offsets = torch.empty(C * N, device=device, dtype=torch.int32)
        total = torch.zeros(1, device=device, dtype=torch.int32)
        starts = torch.zeros(tile_count, device=device, dtype=torch.int32)
        ends = torch.zeros(tile_count, device=device, dtype=torch.int32)
        w_counts, w_offsets, w_total = _wrap(counts, ctype=False), _wrap(offsets, ctype=False), _wrap(total)
        if N:
            launch(splat.count_tiles, dim=(C, N), device=wdev, means2d=w_means2d, radii=w_radii, tiles_x=tiles_x,
                   tiles_y=tiles_y, counts_out=w_counts)
            wp.utils.array_scan(w_counts, w_offsets, inclusive=False)
            launch(splat.intersection_total, dim=1, device=wdev, counts=w_counts, offsets=w_offsets,
                   total_out=w_total)
        sorted_count = capacity if capacity is not None else int(total[0])
        keys = torch.empty(2 * max(sorted_count, 1), device=device, dtype=torch.int64)
        ids = torch.empty(2 * max(sorted_count, 1), device=device, dtype=torch.int32)
        if N and sorted_count:
            w_keys, w_ids = _wrap(keys, ctype=False), _wrap(ids, ctype=False)
            if capacity is not None:
                launch(splat.pad_intersections, dim=capacity, device=wdev, total=w_total,
                       sentinel=wp.int64(tile_count << 32), keys_out=w_keys, values_out=w_ids)
            launch(splat.emit_intersections, dim=(C, N), device=wdev, means2d=w_means2d, radii=w_radii,
                   depths=_wrap(depths.contiguous()), offsets=w_offsets, tiles_x=tiles_x, tiles_y=tiles_y,
                   capacity=sorted_count, keys_out=w_keys, values_out=w_ids)
            # only the bits in use: 32 of depth and enough for every (camera, tile) id and the padding's
            wp.utils.radix_sort_pairs(w_keys, w_ids, sorted_count, end_bit=32 + tile_count.bit_length())
            launch(splat.tile_ranges, dim=sorted_count, device=wdev, keys=w_keys, count=sorted_count,
                   tile_count=tile_count, starts_out=_wrap(starts), ends_out=_wrap(ends))
    return Intersections(gaussian_ids=ids, tile_starts=starts, tile_ends=ends, count=total,
                         sorted_count=sorted_count)


# ----------------------------------------------------------------------------------------------------------------
# composite


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, radii, colors, opacities, depths, backgrounds, gaussian_ids, tile_starts,
                tile_ends, settings: RasterSettings):
        wp = warp()
        from ..kernels import raster_block, splat

        device = means2d.device
        wdev = warp_device(device)
        C, N, D = colors.shape
        W, H = settings.width, settings.height
        tiles_x, tiles_y = settings.tiles
        channels = D + int(settings.with_depth)
        # per (camera, Gaussian), flattened c * N + g, as the kernels read them
        means2d = means2d.reshape(C * N, 2).contiguous()
        conics = conics.reshape(C * N, 3).contiguous()
        radii = radii.reshape(C * N, 2).contiguous()
        colors = (colors.reshape(C * N, D) if D else torch.zeros(C * N, 1, device=device)).float().contiguous()
        opacities = opacities.reshape(C * N).contiguous()
        depths = depths.reshape(C * N).contiguous()
        backgrounds = (backgrounds if D else torch.zeros(C, 1, device=device)).float().contiguous()
        accumulates = D > 4 or settings.path == "tile"  # these write the image with +=
        image = (torch.zeros if accumulates else torch.empty)(C * H * W, max(channels, 1), device=device)
        alpha = torch.empty(C * H * W, device=device)
        T_final = torch.empty(C * H * W, device=device)
        last = torch.empty(C * H * W, device=device, dtype=torch.int32)
        proj = _projected(means2d, colors, opacities, depths)
        raster = _raster(settings, backgrounds, gaussian_ids, tile_starts, tile_ends, D)
        with torch_stream(device):
            if settings.path == "block":
                # the block path evaluates the exponent from the conic's principal axes (kernels/raster_block.py)
                axes = torch.empty(C * N, 4, device=device)
                if N:
                    launch(raster_block.conic_axes, dim=C * N, device=wdev, conics=_wrap(conics, wp.vec3d),
                           axes_out=_wrap(axes, wp.vec4))
                footprints = axes
                with cpu_blocks(wdev):
                    launch(raster_block.rasterize_forward_block, dim=C * tiles_y * tiles_x, block_dim=BLOCK,
                           device=wdev, proj=proj, axes=_wrap(axes, wp.vec4), raster=raster, image_out=_wrap(image),
                           alpha_out=_wrap(alpha), T_out=_wrap(T_final), last_out=_wrap(last))
            else:
                footprints = conics
                launch(splat.rasterize_forward_tiles, dim=(C, tiles_y, tiles_x), device=wdev, proj=proj,
                       conics=_wrap(conics, wp.vec3d), radii=_wrap(radii, wp.vec2i), raster=raster,
                       image_out=_wrap(image), alpha_out=_wrap(alpha), T_out=_wrap(T_final), last_out=_wrap(last),
                       done_scratch=_wrap(torch.zeros(C * H * W, device=device, dtype=torch.int32)))
        ctx.settings = settings
        ctx.shape = (C, N, D)
        ctx.save_for_backward(means2d, footprints, radii, colors, opacities, depths, backgrounds, gaussian_ids,
                              tile_starts, tile_ends, T_final, last)
        ctx.structs = (proj, raster)  # the backward launches with them again, not rebuilt (as _Project's views)
        return image[:, :channels].reshape(C, H, W, channels), alpha.reshape(C, H, W, 1)

    @staticmethod
    def backward(ctx, v_image, v_alpha):
        wp = warp()
        from ..kernels import raster_block, splat

        (means2d, footprints, radii, _, _, _, _, _, _, _, T_final, last) = ctx.saved_tensors
        proj, raster = ctx.structs
        settings = ctx.settings
        C, N, D = ctx.shape
        W, H = settings.width, settings.height
        tiles_x, tiles_y = settings.tiles
        channels = D + int(settings.with_depth)
        device = means2d.device
        wdev = warp_device(device)
        if channels:
            v_image = v_image.reshape(C * H * W, channels).float().contiguous()
        else:
            v_image = torch.zeros(C * H * W, 1, device=device)
        v_alpha = v_alpha.reshape(-1).float().contiguous()
        v_colors = torch.zeros(C * N, max(D, 1), device=device)
        v_backgrounds = torch.zeros(C, max(D, 1), device=device)
        cotangents = dict(T_final=_wrap(T_final), last=_wrap(last), v_image=_wrap(v_image), v_alpha_out=_wrap(v_alpha),
                          v_backgrounds=_wrap(v_backgrounds))
        with torch_stream(device):
            if settings.path == "block":
                slots = torch.zeros(C * N, raster_block.SLOTS, device=device)
                with cpu_blocks(wdev):
                    launch(raster_block.rasterize_backward_block, dim=C * tiles_y * tiles_x, block_dim=BLOCK,
                           device=wdev, proj=proj, axes=_wrap(footprints, wp.vec4), raster=raster, **cotangents,
                           v_slots=_wrap(slots.reshape(-1)), v_colors_rest=_wrap(v_colors.reshape(-1)))
                kept = min(D, 4)
                v_colors[:, :kept] = slots[:, :kept]
                v_means2d, v_conics, v_depths = slots[:, 4:6], slots[:, 6:9].double(), slots[:, 10]
                v_opacities = slots[:, 9]
            else:
                v_means2d = torch.zeros(C * N, 2, device=device)
                v_conics = torch.zeros(C * N, 3, device=device, dtype=torch.float64)
                v_depths = torch.zeros(C * N, device=device)
                v_opacities = torch.zeros(C * N, device=device)
                scratch = [_wrap(torch.zeros(C * H * W, device=device)) for _ in range(3)]
                launch(splat.rasterize_backward_tiles, dim=(C, tiles_y, tiles_x), device=wdev, proj=proj,
                       conics=_wrap(footprints, wp.vec3d), radii=_wrap(radii, wp.vec2i), raster=raster, **cotangents,
                       T_scratch=scratch[0], behind_scratch=scratch[1], bg_scratch=scratch[2],
                       v_means2d=_wrap(v_means2d, wp.vec2), v_conics=_wrap(v_conics, wp.vec3d),
                       v_colors=_wrap(v_colors), v_opacities=_wrap(v_opacities), v_depths=_wrap(v_depths))
        return (v_means2d.reshape(C, N, 2), v_conics.reshape(C, N, 3), None, v_colors[:, :D].reshape(C, N, D),
                v_opacities.reshape(C, N), v_depths.reshape(C, N), v_backgrounds[:, :D], None, None, None, None)


def _projected(means2d, colors, opacities, depths):
    """The projected Gaussians as the compositing kernels read them (kernels/splat.py Projected)."""
    wp = warp()
    from ..kernels import splat

    proj = splat.Projected()
    proj.means2d = _wrap(means2d, wp.vec2, ctype=False)
    proj.colors = _wrap(colors, ctype=False)
    proj.opacities = _wrap(opacities, ctype=False)
    proj.depths = _wrap(depths, ctype=False)
    return proj


def _raster(s: RasterSettings, backgrounds, gaussian_ids, tile_starts, tile_ends, color_channels: int):
    """The intersections, frame, backgrounds and cut-offs as the compositing kernels read them (kernels/splat.py
    Raster)."""
    from ..kernels import splat

    raster = splat.Raster()
    raster.gaussian_ids = _wrap(gaussian_ids, ctype=False)
    raster.tile_starts = _wrap(tile_starts, ctype=False)
    raster.tile_ends = _wrap(tile_ends, ctype=False)
    raster.tiles_x, raster.tiles_y = s.tiles
    raster.width = s.width
    raster.height = s.height
    raster.color_channels = color_channels
    raster.with_depth = int(s.with_depth)
    raster.backgrounds = _wrap(backgrounds, ctype=False)
    raster.alpha_min = s.alpha_min
    raster.t_stop = s.t_stop
    return raster


def composite(means2d, conics, radii, colors, opacities, depths, backgrounds, isect: Intersections,
              settings: RasterSettings):
    """Front-to-back compositing of the projected Gaussians (``project``) along the sorted intersections
    (``intersect``): colors [C, N, D], backgrounds [C, D] -> image [C, H, W, D (+1 with_depth: the accumulated
    depth sum_i w_i z_i)], alpha [C, H, W, 1]. Gradients reach means2d, conics, colors, opacities, depths and
    backgrounds (the hand-written adjoint)."""
    return _Composite.apply(means2d, conics, radii, colors, opacities, depths, backgrounds, isect.gaussian_ids,
                            isect.tile_starts, isect.tile_ends, settings)
