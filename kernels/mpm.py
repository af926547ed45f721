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


# per B-spline order: nodes per axis, the shift giving the stencil base floor(g - shift), the weight function
BSPLINES = {
    "quadratic": (3, 0.5, quadratic_weights),
    "cubic": (4, 1.0, cubic_weights),
}


def _p2g_mass_kernel(order: str):
    width, shift, weights = BSPLINES[order]

    @wp.kernel(module="unique")
    def p2g_mass(
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
        bx = clamp_base(int(wp.floor(g[0] - wp.static(shift))), grid_mass_out.shape[0], wp.static(width))
        by = clamp_base(int(wp.floor(g[1] - wp.static(shift))), grid_mass_out.shape[1], wp.static(width))
        bz = clamp_base(int(wp.floor(g[2] - wp.static(shift))), grid_mass_out.shape[2], wp.static(width))
        wx = weights(g[0] - float(bx))
        wy = weights(g[1] - float(by))
        wz = weights(g[2] - float(bz))
        m = mass_in[p]
        for i in range(wp.static(width)):
            for j in range(wp.static(width)):
                for k in range(wp.static(width)):
                    wp.atomic_add(grid_mass_out, bx + i, by + j, bz + k, wx[i] * wy[j] * wz[k] * m)

    return p2g_mass


# particle mass -> grid mass, one kernel per B-spline order
p2g_mass = {order: _p2g_mass_kernel(order) for order in BSPLINES}
