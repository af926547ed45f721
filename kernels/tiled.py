"""P2G with a shared-memory reduction per block of particles (a CUDA forward-only speed path; sim/tiled.py runs it,
``diffmpm bench`` uses it). Built from the same per-particle pieces as kernels/mpm.py's P2G."""

import warp as wp

from .mpm import BSPLINES, _affine_at_func, _cached, _models, _stencil_func

P2G_BLOCK = 128  # particles per block on CUDA (the CPU runs blocks of 1, for tests)

# P2G with a shared-memory reduction (CUDA, forward only): each block of particles gathers its stencil contributions
# into a shared tile covering the block's bounding box of nodes, then adds each touched node to the global grid once.
# Blocks whose box exceeds the tile fall back to global atomics, so the result never depends on particle order;
# only the speed does (sort particles by cell for compact boxes). The taped path uses ``p2g`` above.

TILE_NODES = 1024  # nodes per shared tile (vec4: momentum + mass, 16 KiB)


@wp.func
def cell_key(x: wp.vec3, grid_lower: wp.vec3, inv_dx: float, shift: float, ny: int, nz: int):
    """Linear index of a particle's stencil base cell (the sort key that makes blocks compact)."""
    g = (x - grid_lower) * inv_dx
    return (int(wp.floor(g[0] - shift)) * ny + int(wp.floor(g[1] - shift))) * nz + int(wp.floor(g[2] - shift))


@wp.kernel
def cell_keys(
    grid_lower: wp.vec3,
    inv_dx: float,
    shift: float,
    ny: int,
    nz: int,
    x_in: wp.array(dtype=wp.vec3),
    keys_out: wp.array(dtype=int),
    order_out: wp.array(dtype=int),
):
    p = wp.tid()
    keys_out[p] = cell_key(x_in[p], grid_lower, inv_dx, shift, ny, nz)
    order_out[p] = p


def _p2g_tiled_kernel(order: str, models: tuple, block_dim: int):
    width = BSPLINES[order][0]
    stencil = _stencil_func(order)
    affine_at = _affine_at_func(order, models)

    @wp.kernel(module="unique")
    def p2g_tiled(
        # model
        grid_lower: wp.vec3,
        dx: float,
        dt: float,
        particle_volume: wp.array(dtype=float),
        particle_mass: wp.array(dtype=float),
        mu: wp.array(dtype=float),
        lam: wp.array(dtype=float),
        kappa: wp.array(dtype=wp.vec3),
        model_code: wp.array(dtype=int),
        bulk_viscosity: float,
        # controls
        Fc: wp.array2d(dtype=wp.mat33),
        control: int,
        # particle visiting order (a permutation; sorted by cell for speed)
        order: wp.array(dtype=int),
        # state in
        x_in: wp.array(dtype=wp.vec3),
        v_in: wp.array(dtype=wp.vec3),
        F_in: wp.array(dtype=wp.mat33),
        C_in: wp.array(dtype=wp.mat33),
        Jp_in: wp.array(dtype=float),
        # grid out
        grid_mass_out: wp.array3d(dtype=float),
        grid_momentum_out: wp.array3d(dtype=wp.vec3),
    ):
        block, lane = wp.tid()
        n = x_in.shape[0]
        slot = block * wp.static(block_dim) + lane
        active = slot < n
        p = order[wp.min(slot, n - 1)]
        inv_dx = 1.0 / dx
        x = x_in[p]
        bx, by, bz, wx, wy, wz = stencil(x, grid_lower, inv_dx, grid_mass_out.shape[0], grid_mass_out.shape[1],
                                         grid_mass_out.shape[2])
        m = particle_mass[p]
        affine = affine_at(p, dx, dt, particle_volume, particle_mass, mu, lam, kappa, model_code, bulk_viscosity, Fc,
                           control, F_in, C_in, Jp_in)
        mv = m * v_in[p]
        # the block's box of stencil nodes
        lo_x = wp.tile_extract(wp.tile_min(wp.tile(bx)), 0)
        lo_y = wp.tile_extract(wp.tile_min(wp.tile(by)), 0)
        lo_z = wp.tile_extract(wp.tile_min(wp.tile(bz)), 0)
        ex = wp.tile_extract(wp.tile_max(wp.tile(bx)), 0) - lo_x + wp.static(width)
        ey = wp.tile_extract(wp.tile_max(wp.tile(by)), 0) - lo_y + wp.static(width)
        ez = wp.tile_extract(wp.tile_max(wp.tile(bz)), 0) - lo_z + wp.static(width)
        if ex * ey * ez <= TILE_NODES:
            acc = wp.tile_zeros(shape=TILE_NODES, dtype=wp.vec4, storage="shared")
            for i in range(wp.static(width)):
                for j in range(wp.static(width)):
                    for k in range(wp.static(width)):
                        w = wx[i] * wy[j] * wz[k]
                        node = wp.vec3(float(bx + i), float(by + j), float(bz + k)) * dx + grid_lower
                        mom = w * (mv + affine * (node - x))
                        local = ((bx + i - lo_x) * ey + (by + j - lo_y)) * ez + (bz + k - lo_z)
                        wp.tile_scatter_add(acc, local, wp.vec4(mom[0], mom[1], mom[2], w * m), active)
            count = ex * ey * ez
            idx = lane
            while idx < count:
                value = acc[idx]
                if value[3] != 0.0:
                    ix = idx // (ey * ez)
                    iy = (idx // ez) % ey
                    iz = idx % ez
                    wp.atomic_add(grid_mass_out, lo_x + ix, lo_y + iy, lo_z + iz, value[3])
                    wp.atomic_add(grid_momentum_out, lo_x + ix, lo_y + iy, lo_z + iz,
                                  wp.vec3(value[0], value[1], value[2]))
                idx += wp.static(block_dim)
        elif active:
            for i in range(wp.static(width)):
                for j in range(wp.static(width)):
                    for k in range(wp.static(width)):
                        w = wx[i] * wy[j] * wz[k]
                        node = wp.vec3(float(bx + i), float(by + j), float(bz + k)) * dx + grid_lower
                        wp.atomic_add(grid_mass_out, bx + i, by + j, bz + k, w * m)
                        wp.atomic_add(grid_momentum_out, bx + i, by + j, bz + k, w * (mv + affine * (node - x)))

    return p2g_tiled


def p2g_tiled(order: str, models, block_dim: int = P2G_BLOCK):
    return _cached(_p2g_tiled_kernel, order, _models(models), block_dim)
