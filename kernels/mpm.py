"""MPM transfer kernels: B-spline weights and particle-to-grid transfers.

Grid node (i, j, k) sits at ``grid_lower + (i, j, k) dx``. A particle at grid coordinate g = (x - lower) / dx has
stencil base ``floor(g - 0.5)`` (quadratic, 3 nodes per axis) or ``floor(g) - 1`` (cubic, 4 nodes per axis).
"""

import warp as wp


@wp.func
def quadratic_weights(fx: float):
    """Weights of nodes base, base+1, base+2 for fx = g - base in [0.5, 1.5)."""
    return wp.vec3(0.5 * (1.5 - fx) * (1.5 - fx), 0.75 - (fx - 1.0) * (fx - 1.0), 0.5 * (fx - 0.5) * (fx - 0.5))


@wp.func
def cubic_near(d: float):
    """Cubic B-spline at distance d in [0, 1]."""
    return 0.5 * d * d * d - d * d + 2.0 / 3.0


@wp.func
def cubic_far(d: float):
    """Cubic B-spline at distance d in [1, 2]."""
    r = 2.0 - d
    return r * r * r / 6.0


@wp.func
def cubic_weights(fx: float):
    """Weights of nodes base .. base+3 for fx = g - base in [1, 2)."""
    return wp.vec4(cubic_far(fx), cubic_near(fx - 1.0), cubic_near(2.0 - fx), cubic_far(3.0 - fx))


@wp.func
def clamp_base(b: int, n: int, width: int):
    """Keep a stencil of ``width`` nodes starting at ``b`` inside [0, n)."""
    return wp.clamp(b, 0, n - width)


@wp.kernel
def p2g_mass_quadratic(
    # model
    grid_lower: wp.vec3,
    inv_dx: float,
    # state in
    x_in: wp.array(dtype=wp.vec3),
    mass_in: wp.array(dtype=float),
    # state out
    grid_mass_out: wp.array3d(dtype=float),
):
    p = wp.tid()
    g = (x_in[p] - grid_lower) * inv_dx
    bx = clamp_base(int(wp.floor(g[0] - 0.5)), grid_mass_out.shape[0], 3)
    by = clamp_base(int(wp.floor(g[1] - 0.5)), grid_mass_out.shape[1], 3)
    bz = clamp_base(int(wp.floor(g[2] - 0.5)), grid_mass_out.shape[2], 3)
    wx = quadratic_weights(g[0] - float(bx))
    wy = quadratic_weights(g[1] - float(by))
    wz = quadratic_weights(g[2] - float(bz))
    m = mass_in[p]
    for i in range(3):
        for j in range(3):
            for k in range(3):
                wp.atomic_add(grid_mass_out, bx + i, by + j, bz + k, wx[i] * wy[j] * wz[k] * m)


@wp.kernel
def p2g_mass_cubic(
    # model
    grid_lower: wp.vec3,
    inv_dx: float,
    # state in
    x_in: wp.array(dtype=wp.vec3),
    mass_in: wp.array(dtype=float),
    # state out
    grid_mass_out: wp.array3d(dtype=float),
):
    p = wp.tid()
    g = (x_in[p] - grid_lower) * inv_dx
    bx = clamp_base(int(wp.floor(g[0])) - 1, grid_mass_out.shape[0], 4)
    by = clamp_base(int(wp.floor(g[1])) - 1, grid_mass_out.shape[1], 4)
    bz = clamp_base(int(wp.floor(g[2])) - 1, grid_mass_out.shape[2], 4)
    wx = cubic_weights(g[0] - float(bx))
    wy = cubic_weights(g[1] - float(by))
    wz = cubic_weights(g[2] - float(bz))
    m = mass_in[p]
    for i in range(4):
        for j in range(4):
            for k in range(4):
                wp.atomic_add(grid_mass_out, bx + i, by + j, bz + k, wx[i] * wy[j] * wz[k] * m)
