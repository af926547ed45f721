"""MLS-MPM kernels: B-spline weights, constitutive models, P2G, grid update, G2P.

Grid node (i, j, k) sits at ``grid_lower + (i, j, k) dx``. A particle at grid coordinate g = (x - lower) / dx has
stencil base ``floor(g - shift)``: shift 0.5 and 3 nodes per axis (quadratic), shift 1 and 4 nodes (cubic). The
APIC/MLS inertia factor is D^-1 = 4 / dx^2 (quadratic) or 3 / dx^2 (cubic).

One step, for control index ``control`` (-1 off control steps):
  F~ = Fc[control] F                          stress from F~ (Kirchhoff tau = P(F~) F~^T, + bulk viscosity)
  P2G   m_i += w m_p;  p_i += w (m_p v_p + (m_p C_p - dt V_p D^-1 tau_p)(x_i - x_p))
  grid  v_i = p_i / m_i + dt g (0 where m_i <= mass_eps), then floor contact (nodes with n . x_i < h + dx/2: the
        node row nearest the plane and every row below it), then walls
  G2P   v_p = sum w v_i;  C_p = D^-1 sum w v_i (x_i - x_p)^T;  F+ = Z((I + dt C) F~) with Z the material's return
        mapping (the identity for elastic models);  J_P+ = J_P det F_trial / det F+ (snow; others carry J_P);
        x+ = x + dt v  (held inside);
        each particle's lowest det F+ so far is kept (snow: det F_E J_P; not differentiated: a validity record)
Kernels are built per B-spline order and tuple of constitutive models (a scene's ``models``; each particle's
``model_code`` is its model's index there, read only where the tuple holds several) by factories using ``wp.static``
closures.
"""

import functools

import warp as wp

from ..enums import BSpline, DecisionMode, WallKind
from .materials import (  # noqa: F401 (host reads them here)
    ELASTIC_MODELS,
    KERNEL_MODELS,
    MATERIALS,
    PLASTIC_MODELS,
    PLASTIC_VOLUME_MODELS,
    model_dispatch,
    polar_rotation,
    snow_code,
)
from .transfer import TRANSFERS, own_control, own_float, own_mat33, own_vec3
from .viscoplastic import snow_clamp_jvp, snow_F

# ----------------------------------------------------------------------------------------------------------------
# B-splines


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


# per B-spline order: nodes per axis, the shift giving the stencil base floor(g - shift), the weight function,
# and the MLS inertia factor D^-1 dx^2
BSPLINES = {
    BSpline.QUADRATIC: (3, 0.5, quadratic_weights, 4.0),
    BSpline.CUBIC: (4, 1.0, cubic_weights, 3.0),
}

# wall conditions (sim.boundaries): the host's WallKind members, as ints at the kernel boundary
WALL_STICKY = wp.constant(WallKind.STICKY.code)
WALL_SLIP = wp.constant(WallKind.SLIP.code)
WALL_SEPARATE = wp.constant(WallKind.SEPARATE.code)

# constitutive models (stress, return mapping, its branch per model): kernels/materials.py


@wp.func
def controlled_F(F: wp.mat33, Fc: wp.array2d(dtype=wp.mat33), control: int, p: int):
    """F~ = Fc[control, p] F on control steps (control >= 0), else F (written with one return at the
    end: the early-return form it replaced went out with the adjoint fixes of commit 7690977, and functions that
    feed taped launches keep to one return).

    Fc is a multiplicative control (diffmpm_cli/sim/controls.py builds it as exp of a bounded, trace-limited log
    strain, so det Fc > 0: a control can never invert a particle)."""
    out = F
    if control >= 0:
        out = own_control(Fc, control, p) * F
    return out


# ----------------------------------------------------------------------------------------------------------------
# per-particle transfer pieces shared by the kernels (built per B-spline order / material)


@functools.cache
def _stencil_func(order: str):
    width, shift, weights, _ = BSPLINES[order]

    @wp.func
    def stencil(x: wp.vec3, grid_lower: wp.vec3, inv_dx: float, nx: int, ny: int, nz: int):
        """Base node of a particle's stencil (kept inside the grid) and its weights along x, y and z."""
        g = (x - grid_lower) * inv_dx
        bx = clamp_base(int(wp.floor(g[0] - wp.static(shift))), nx, wp.static(width))
        by = clamp_base(int(wp.floor(g[1] - wp.static(shift))), ny, wp.static(width))
        bz = clamp_base(int(wp.floor(g[2] - wp.static(shift))), nz, wp.static(width))
        return bx, by, bz, weights(g[0] - float(bx)), weights(g[1] - float(by)), weights(g[2] - float(bz))

    return stencil


@functools.cache
def _affine_func(order: str, models: tuple):
    inertia = BSPLINES[order][3]
    stress = model_dispatch(models)[0]

    @wp.func
    def particle_affine(code: int, F: wp.mat33, C: wp.mat33, mu: float, lam: float, kappa: wp.vec3, Jp: float,
                        m: float, volume: float, dt: float, inv_dx: float, bulk_viscosity: float):
        """MLS/APIC affine momentum m C - dt V D^-1 tau(F) (+ bulk viscosity zeta tr(C) I in tau); code: the
        particle's model, kappa: its parameter vector, Jp: its plastic volume ratio (snow)."""
        tau = stress(code, F, C, mu, lam, kappa, Jp)
        if bulk_viscosity > 0.0:
            tau = tau + wp.identity(3, dtype=float) * (bulk_viscosity * wp.trace(C))
        return m * C - (dt * volume * wp.static(inertia) * inv_dx * inv_dx) * tau

    return particle_affine


# ----------------------------------------------------------------------------------------------------------------
# particle -> grid


def _p2g_mass_kernel(order: str):
    width = BSPLINES[order][0]
    stencil = _stencil_func(order)

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
        bx, by, bz, wx, wy, wz = stencil(x_in[p], grid_lower, inv_dx, grid_mass_out.shape[0], grid_mass_out.shape[1],
                                         grid_mass_out.shape[2])
        m = mass_in[p]
        for i in range(wp.static(width)):
            for j in range(wp.static(width)):
                for k in range(wp.static(width)):
                    wp.atomic_add(grid_mass_out, bx + i, by + j, bz + k, wx[i] * wy[j] * wz[k] * m)

    return p2g_mass


@functools.cache
def _affine_at_func(order: str, models: tuple):
    particle_affine = _affine_func(order, models)
    stressed_by_kappa = any(m not in ELASTIC_MODELS for m in models)
    hardens = snow_code(models) >= 0
    mixed = len(models) > 1

    @wp.func
    def affine_at(p: int, dx: float, dt: float, particle_volume: wp.array(dtype=float),
                  particle_mass: wp.array(dtype=float), mu: wp.array(dtype=float), lam: wp.array(dtype=float),
                  kappa: wp.array(dtype=wp.vec3), model_code: wp.array(dtype=int), bulk_viscosity: float,
                  Fc: wp.array2d(dtype=wp.mat33), control: int, F_in: wp.array(dtype=wp.mat33),
                  C_in: wp.array(dtype=wp.mat33), Jp_in: wp.array(dtype=float)):
        """Particle p's affine momentum (``particle_affine`` of its model, F~ = Fc[control] F, C and parameters)."""
        code = int(0)
        if wp.static(mixed):  # one model: no code read, no branch
            code = model_code[p]
        kappa_p = wp.vec3(0.0)
        if wp.static(stressed_by_kappa):  # elastic models never read kappa (nor add its zero adjoint)
            kappa_p = own_vec3(kappa, p)
        Jp = float(1.0)
        if wp.static(hardens):  # only snow reads J_P (other models' stresses ignore it)
            Jp = own_float(Jp_in, p)
        return particle_affine(code, controlled_F(own_mat33(F_in, p), Fc, control, p), own_mat33(C_in, p),
                               own_float(mu, p), own_float(lam, p), kappa_p, Jp,
                               particle_mass[p], particle_volume[p], dt, 1.0 / dx, bulk_viscosity)

    return affine_at


@functools.cache
def _scatter_particle_func(order: str):
    scatter = TRANSFERS[order][0]
    stencil = _stencil_func(order)

    @wp.func
    def scatter_particle(p: int, affine: wp.mat33, grid_lower: wp.vec3, dx: float,
                         particle_mass: wp.array(dtype=float), x_in: wp.array(dtype=wp.vec3),
                         v_in: wp.array(dtype=wp.vec3), grid_out: wp.array3d(dtype=wp.vec4)):
        """Particle p's mass and APIC/MLS momentum (with its ``affine`` momentum) into its stencil's nodes."""
        x = own_vec3(x_in, p)
        bx, by, bz, wx, wy, wz = stencil(x, grid_lower, 1.0 / dx, grid_out.shape[0], grid_out.shape[1],
                                         grid_out.shape[2])
        m = particle_mass[p]
        scatter(grid_out, bx, by, bz, wx, wy, wz, x, grid_lower, dx, m, m * own_vec3(v_in, p), affine)

    return scatter_particle


def _p2g_kernel(order: str, models: tuple):
    scatter_particle = _scatter_particle_func(order)
    affine_at = _affine_at_func(order, models)

    @wp.kernel(module="unique")
    def p2g(
        # model
        grid_lower: wp.vec3,
        dx: float,
        dt: float,
        particle_volume: wp.array(dtype=float),
        particle_mass: wp.array(dtype=float),
        mu: wp.array(dtype=float),
        lam: wp.array(dtype=float),
        kappa: wp.array(dtype=wp.vec3),
        model_code: wp.array(dtype=int),  # each particle's model: its index in the scene's models
        bulk_viscosity: float,
        # controls
        Fc: wp.array2d(dtype=wp.mat33),
        control: int,
        # state in
        x_in: wp.array(dtype=wp.vec3),
        v_in: wp.array(dtype=wp.vec3),
        F_in: wp.array(dtype=wp.mat33),
        C_in: wp.array(dtype=wp.mat33),
        Jp_in: wp.array(dtype=float),
        # grid out: (mass, momentum) per node
        grid_out: wp.array3d(dtype=wp.vec4),
    ):
        p = wp.tid()
        affine = affine_at(p, dx, dt, particle_volume, particle_mass, mu, lam, kappa, model_code, bulk_viscosity, Fc,
                           control, F_in, C_in, Jp_in)
        scatter_particle(p, affine, grid_lower, dx, particle_mass, x_in, v_in, grid_out)

    return p2g


# The backward of a taped P2G runs as two kernels (sim/launch.py p2g): ``p2g_affine`` (each particle's affine
# momentum: the stress, whose adjoint Warp generates) and ``p2g_transfer`` (the scatter, whose adjoint is the
# hand-written gather above), joined by one affine [N] mat33 array and its gradient. The fused ``p2g``'s generated
# adjoint held the stress adjoint's registers (168 per thread on an H200: one block per SM) through the 27-node gather
# and ran at 694 us for 1M particles (BENCHMARKS.md). Both halves compute what ``p2g`` computes, so the forward keeps
# the fused kernel.


def _p2g_affine_kernel(order: str, models: tuple):
    affine_at = _affine_at_func(order, models)

    @wp.kernel(module="unique")
    def p2g_affine(
        # model
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
        # state in
        F_in: wp.array(dtype=wp.mat33),
        C_in: wp.array(dtype=wp.mat33),
        Jp_in: wp.array(dtype=float),
        # out
        affine_out: wp.array(dtype=wp.mat33),
    ):
        p = wp.tid()
        affine_out[p] = affine_at(p, dx, dt, particle_volume, particle_mass, mu, lam, kappa, model_code,
                                  bulk_viscosity, Fc, control, F_in, C_in, Jp_in)

    return p2g_affine


def _p2g_transfer_kernel(order: str):
    scatter_particle = _scatter_particle_func(order)

    @wp.kernel(module="unique")
    def p2g_transfer(
        # model
        grid_lower: wp.vec3,
        dx: float,
        particle_mass: wp.array(dtype=float),
        # state in
        x_in: wp.array(dtype=wp.vec3),
        v_in: wp.array(dtype=wp.vec3),
        affine_in: wp.array(dtype=wp.mat33),
        # grid out: (mass, momentum) per node
        grid_out: wp.array3d(dtype=wp.vec4),
    ):
        p = wp.tid()
        scatter_particle(p, own_mat33(affine_in, p), grid_lower, dx, particle_mass, x_in, v_in, grid_out)

    return p2g_transfer


# ----------------------------------------------------------------------------------------------------------------
# grid update


@wp.func
def axis_vector(axis: int):
    e = wp.vec3(0.0)
    if axis == 0:
        e = wp.vec3(1.0, 0.0, 0.0)
    elif axis == 1:
        e = wp.vec3(0.0, 1.0, 0.0)
    else:
        e = wp.vec3(0.0, 0.0, 1.0)
    return e


@wp.func
def wall(v: wp.vec3, axis: int, kind: int, outward: float, forced: int):
    """Apply a wall condition on component ``axis``; ``outward`` is +1 for a max face, -1 for a min face.

    A separating wall decides whether the node moves outwards (then that motion is stopped); ``forced`` >= 0 takes
    that decision as given (replayed decisions, see grid_update), -1 computes it. Returns (velocity, decision).
    Written without in-place component assignment (``v[a] = ...``), whose generated adjoint double counts.
    """
    e = axis_vector(axis)
    vn = wp.dot(v, e)
    out = v
    stop = int(0)
    if kind == WALL_STICKY:
        out = wp.vec3(0.0)
    elif kind == WALL_SLIP:
        out = v - vn * e
    else:
        stop = int(vn * outward > 0.0)
        if forced >= 0:
            stop = forced
        if stop != 0:
            out = v - vn * e
    return out, stop


# Decisions of one node in one step, as bits of one byte: which branch of each kink the update took. The forward
# of a differentiable rollout records them and its backward replays them, so both differentiate the same branches
# (sim/solver.py); the gradient checker also replays a base rollout's decisions in perturbed ones, which makes a
# rollout with contact smooth around that base. A node lies in the wall band of at most one face per axis (the
# grid keeps an interior: GridSpec refuses shape <= 2 band), so one bit per axis says whether its wall stopped it.
NODE_ACTIVE = wp.constant(1)  # m > mass_eps
FLOOR_CONTACT = wp.constant(2)  # on or below the floor's node row and moving into it
FLOOR_STICK = wp.constant(4)  # friction stops the tangential motion
WALL_BIT0 = wp.constant(8)  # walls: bit 3 + axis (the min or the max face, whichever band the node is in)
DECIDE = wp.constant(DecisionMode.DECIDE.value)
RECORD = wp.constant(DecisionMode.RECORD.value)
REPLAY = wp.constant(DecisionMode.REPLAY.value)
LINEARISE = wp.constant(DecisionMode.LINEARISE.value)  # G2P only (the grid update gets REPLAY): see _g2p_kernel
DECISION_DTYPE = wp.uint8


@wp.func
def forced_bit(code: int, bit: int, mode: int):
    """-1 (decide) unless replaying, then whether ``bit`` is set in ``code``."""
    out = int(-1)
    if mode == REPLAY:
        out = int((code & bit) != 0)
    return out


BOX_THREADS = 32768  # launches over a grid's box on CUDA: fixed (graph-capturable); each thread strides over the box


def box_threads(device) -> int:
    """Threads of a launch that strides over a grid's box (grid_update, bounds.clear_box) on the Warp ``device``:
    BOX_THREADS on CUDA, 1 on the CPU (one loop, no per-thread calls)."""
    return BOX_THREADS if device.is_cuda else 1


@wp.func
def box_nodes(box: wp.array(dtype=int), width: int, shape: wp.vec3i):
    """The nodes of a particle box (kernels/bounds.py: min stencil bases, then minus the max ones) as the corner
    ``lo`` and the end ``hi`` (exclusive), up to ``width`` nodes from the bases and inside ``shape``; an empty box
    (BOX_EMPTY) gives lo >= hi."""
    lo = wp.vec3i(box[0], box[1], box[2])
    hi = wp.vec3i(wp.min(width - box[3], shape[0]), wp.min(width - box[4], shape[1]), wp.min(width - box[5], shape[2]))
    return lo, hi


@wp.func
def box_node(lo: wp.vec3i, hi: wp.vec3i, n: int):
    """The ``n``-th node of the box [lo, hi) (z fastest)."""
    ny = hi[1] - lo[1]
    nz = hi[2] - lo[2]
    return lo[0] + n // (ny * nz), lo[1] + (n // nz) % ny, lo[2] + n % nz


@wp.func
def box_count(lo: wp.vec3i, hi: wp.vec3i):
    """How many nodes the box [lo, hi) holds (0 if empty)."""
    if lo[0] >= hi[0] or lo[1] >= hi[1] or lo[2] >= hi[2]:
        return 0
    return (hi[0] - lo[0]) * (hi[1] - lo[1]) * (hi[2] - lo[2])


@wp.func
def update_node(
    i: int,
    j: int,
    k: int,
    grid_lower: wp.vec3,
    dx: float,
    dt: float,
    gravity: wp.vec3,
    band: int,
    walls_min: wp.vec3i,
    walls_max: wp.vec3i,
    floor_enabled: int,
    floor_normal: wp.vec3,
    floor_height: float,
    friction: float,
    mass_eps: float,
    grid_mass_in: wp.array3d(dtype=float),
    grid_momentum_in: wp.array3d(dtype=wp.vec3),
    decision_mode: int,
    decisions: wp.array3d(dtype=wp.uint8),
    grid_velocity_out: wp.array3d(dtype=wp.vec3),
):
    """One node of the grid update (see grid_update)."""
    m = grid_mass_in[i, j, k]
    code = int(0)
    if decision_mode == REPLAY:
        code = int(decisions[i, j, k])
    active = m > mass_eps  # nodes barely touched by a stencil edge count as empty (keeps -p/m^2 finite)
    if decision_mode == REPLAY:
        active = (code & NODE_ACTIVE) != 0 and m > 0.0
    taken = int(0)
    v = wp.vec3(0.0)
    if active:
        taken = NODE_ACTIVE
        v = grid_momentum_in[i, j, k] / m + dt * gravity
        if floor_enabled != 0:
            node = wp.vec3(float(i), float(j), float(k)) * dx + grid_lower
            # the floor is the node row nearest to the plane: rows less than half a cell above it and all below
            # (docs/MATERIALS.md: with rows strictly below, a body on a node-row floor sank into a cell-deep gap)
            if wp.dot(floor_normal, node) < floor_height + 0.5 * dx:
                vn = wp.dot(v, floor_normal)
                contact = vn < 0.0
                if decision_mode == REPLAY:
                    contact = (code & FLOOR_CONTACT) != 0
                if contact:
                    taken = taken | FLOOR_CONTACT
                    vt = v - vn * floor_normal
                    slide2 = wp.dot(vt, vt)
                    stop = friction * vn  # negative: the friction impulse along -vt
                    stick = slide2 <= stop * stop
                    if decision_mode == REPLAY:
                        stick = (code & FLOOR_STICK) != 0
                    if stick or slide2 == 0.0:
                        taken = taken | FLOOR_STICK
                        v = wp.vec3(0.0)
                    else:
                        v = vt * (1.0 + stop / wp.sqrt(slide2))
        index = wp.vec3i(i, j, k)
        shape = wp.vec3i(grid_mass_in.shape[0], grid_mass_in.shape[1], grid_mass_in.shape[2])
        for a in range(3):
            bit = WALL_BIT0 << a
            # each wall holds the node on its face of the particles' box (index band or shape - band) and those
            # outside it; with index < band the min faces held a node a cell outside the particles (docs/MATERIALS.md)
            if index[a] <= band:
                v, stopped = wall(v, a, walls_min[a], -1.0, forced_bit(code, bit, decision_mode))
                if stopped != 0:
                    taken = taken | bit
            if index[a] >= shape[a] - band:
                v, stopped = wall(v, a, walls_max[a], 1.0, forced_bit(code, bit, decision_mode))
                if stopped != 0:
                    taken = taken | bit
    if decision_mode == RECORD:
        decisions[i, j, k] = wp.uint8(taken)
    grid_velocity_out[i, j, k] = v


@wp.kernel
def grid_update(
    # model
    grid_lower: wp.vec3,
    dx: float,
    dt: float,
    gravity: wp.vec3,
    band: int,
    walls_min: wp.vec3i,
    walls_max: wp.vec3i,
    floor_enabled: int,
    floor_normal: wp.vec3,
    floor_height: float,
    friction: float,
    mass_eps: float,
    # grid in
    grid_mass_in: wp.array3d(dtype=float),
    grid_momentum_in: wp.array3d(dtype=wp.vec3),
    # decisions (DecisionMode): DECIDE (ignored), RECORD (written) or REPLAY (read)
    decision_mode: int,
    decisions: wp.array3d(dtype=wp.uint8),
    # the nodes the particles reach: particle_box's box of stencil bases, and the stencil's width
    box: wp.array(dtype=int),
    width: int,
    # the launch's thread count: each thread takes every threads-th node of the box
    threads: int,
    # grid out
    grid_velocity_out: wp.array3d(dtype=wp.vec3),
):
    """Grid velocities from mass and momentum over the nodes of the particles' box alone: every other node has no
    mass, and no particle reads its velocity (not written) or its decision (not kept). Launched over ``threads``
    threads that stride over the box (BOX_THREADS on CUDA, 1 on the CPU): a launch over every node that returned
    outside the box took 16 us forward and 24 us backward on 128^3 on an H100 for a box of a few per cent of the
    grid. The loop's iterations are independent (one node each, nothing carried), so Warp's adjoint, which replays
    each iteration's forward before its adjoint, is exact."""
    tid = wp.tid()
    shape = wp.vec3i(grid_mass_in.shape[0], grid_mass_in.shape[1], grid_mass_in.shape[2])
    lo, hi = box_nodes(box, width, shape)
    for n in range(tid, box_count(lo, hi), threads):
        i, j, k = box_node(lo, hi, n)
        update_node(i, j, k, grid_lower, dx, dt, gravity, band, walls_min, walls_max, floor_enabled, floor_normal,
                    floor_height, friction, mass_eps, grid_mass_in, grid_momentum_in, decision_mode, decisions,
                    grid_velocity_out)


# ----------------------------------------------------------------------------------------------------------------
# grid -> particle


@wp.func
def snow_linearised(F_trial: wp.mat33, F_star: wp.mat33, mu: float, lam: float, k: wp.vec3, dt: float, branch: int,
                    Jp: float):
    """Snow's return mapping and J_P update (``branch`` != 0) linearised at a recorded F_trial* = ``F_star``:
    (G(F*) + dG(F*)[F_trial - F*], J_P (det F* / det G(F*) + dh(F*)[F_trial - F*])), dG and dh from snow_clamp_jvp
    (float64). At F_trial = F* both equal the true map's float32 results bit for bit (the added terms are 0)."""
    G_star = snow_F(F_star, mu, lam, k, dt, branch)
    dG, dh = snow_clamp_jvp(F_star, wp.mat33d(F_trial) - wp.mat33d(F_star), k, branch)
    return G_star + wp.mat33(dG), Jp * wp.determinant(F_star) / wp.determinant(G_star) + Jp * float(dh)


def _g2p_update_func(models: tuple, linearised: bool):
    """Everything G2P does after its gather, for particle p with the gathered velocity ``v`` and affine field ``C``:
    F_trial = (I + dt C) Fc F, the return mapping (and check-grad's linearised variant, ``linearised``), the seed
    extras, x <- x + dt v held inside the interior, J_P, the validity records. Shared by the fused ``g2p`` and by
    ``g2p_update`` (the first half of a taped G2P's split backward)."""
    _, return_mapping, branch_of = model_dispatch(models)
    maps = any(m not in ELASTIC_MODELS for m in models)
    snow = snow_code(models)
    hardens = snow >= 0
    mixed = len(models) > 1
    linear = linearised and hardens

    @wp.func
    def g2p_update_particle(
        p: int,
        v: wp.vec3,
        C: wp.mat33,
        x: wp.vec3,
        dt: float,
        interior_lower: wp.vec3,
        interior_upper: wp.vec3,
        f_blend: float,
        min_J: float,
        mu: wp.array(dtype=float),
        lam: wp.array(dtype=float),
        kappa: wp.array(dtype=wp.vec3),
        model_code: wp.array(dtype=int),
        Fc: wp.array2d(dtype=wp.mat33),
        control: int,
        F_in: wp.array(dtype=wp.mat33),
        Jp_in: wp.array(dtype=float),
        decision_mode: int,
        decisions: wp.array(dtype=wp.uint8),
        trials: wp.array(dtype=wp.mat33),
        x_out: wp.array(dtype=wp.vec3),
        F_out: wp.array(dtype=wp.mat33),
        Jp_out: wp.array(dtype=float),
        clamped_out: wp.array(dtype=int),
        J_min_out: wp.array(dtype=float),
    ):
        F_trial = (wp.identity(3, dtype=float) + dt * C) * controlled_F(own_mat33(F_in, p), Fc, control, p)
        F = F_trial
        Jp = own_float(Jp_in, p)
        code = int(0)
        if wp.static(mixed):  # one model: no code read, no branch on it
            code = model_code[p]
        if wp.static(maps):  # elastic models: no return mapping, no reads of mu, lam, kappa (nor their adjoints)
            mu_p, lam_p, kappa_p = own_float(mu, p), own_float(lam, p), own_vec3(kappa, p)
            branch = int(0)
            if wp.static(linear):
                if decision_mode == REPLAY or decision_mode == LINEARISE:
                    branch = int(decisions[p])
                else:
                    branch = branch_of(code, F_trial, mu_p, lam_p, kappa_p)
                if decision_mode == RECORD:
                    decisions[p] = wp.uint8(branch)
                    trials[p] = F_trial
                if decision_mode == LINEARISE and code == wp.static(snow) and branch != 0:
                    F, Jp = snow_linearised(F_trial, trials[p], mu_p, lam_p, kappa_p, dt, branch, Jp)
                else:
                    F = return_mapping(code, F_trial, mu_p, lam_p, kappa_p, dt, branch)
                    if code == wp.static(snow):
                        Jp = Jp * wp.determinant(F_trial) / wp.determinant(F)
            else:
                if decision_mode == REPLAY:
                    branch = int(decisions[p])
                else:
                    branch = branch_of(code, F_trial, mu_p, lam_p, kappa_p)
                if decision_mode == RECORD:
                    decisions[p] = wp.uint8(branch)
                F = return_mapping(code, F_trial, mu_p, lam_p, kappa_p, dt, branch)
                if wp.static(hardens):  # snow: what the clamp took from F_E goes to F_P, J_P <- J_P det F_trial / det F_E
                    if code == wp.static(snow):
                        Jp = Jp * wp.determinant(F_trial) / wp.determinant(F)
        if f_blend < 1.0:  # seed extra: F <- a F + (1 - a) I
            F = f_blend * F + (1.0 - f_blend) * wp.identity(3, dtype=float)
        if min_J > 0.0:  # seed extra: det F >= min_J by uniform scaling
            J = wp.determinant(F)
            if J > 0.0 and J < min_J:
                F = F * wp.pow(min_J / J, 1.0 / 3.0)
        x_new = x + dt * v
        held = wp.vec3(  # a new vector: in-place component assignment has a double-counting adjoint
            wp.clamp(x_new[0], interior_lower[0], interior_upper[0]),
            wp.clamp(x_new[1], interior_lower[1], interior_upper[1]),
            wp.clamp(x_new[2], interior_lower[2], interior_upper[2]),
        )
        if held[0] != x_new[0] or held[1] != x_new[1] or held[2] != x_new[2]:
            wp.atomic_add(clamped_out, 0, 1)
        x_out[p] = held
        F_out[p] = F
        Jp_out[p] = Jp  # carried unchanged by every model but snow
        J_now = wp.determinant(F)
        if wp.static(hardens):  # snow's F holds F_E: the whole F = F_E F_P has det F_E J_P (its clamp keeps det F_E > 0)
            if code == wp.static(snow):
                J_now = J_now * Jp
        J_min_out[p] = wp.min(J_min_out[p], J_now)  # validity record: each particle's lowest det F

    return g2p_update_particle


def _g2p_kernel(order: str, models: tuple, linearised: bool = False):
    """G2P for ``models``. ``linearised``: the variant of check-grad's frozen rollouts (only ever launched untaped,
    and only for a scene with snow): RECORD also writes each particle's F_trial into ``trials``, LINEARISE replays the
    branches and gives snow particles their return mapping linearised at that record (snow_linearised). Otherwise
    ``trials`` is never read (normal rollouts pay nothing)."""
    inertia = BSPLINES[order][3]
    gather = TRANSFERS[order][1]
    stencil = _stencil_func(order)
    update = _g2p_update_func(models, linearised)

    @wp.kernel(module="unique")
    def g2p(
        # model
        grid_lower: wp.vec3,
        dx: float,
        dt: float,
        interior_lower: wp.vec3,
        interior_upper: wp.vec3,
        f_blend: float,
        min_J: float,
        mu: wp.array(dtype=float),
        lam: wp.array(dtype=float),
        kappa: wp.array(dtype=wp.vec3),
        model_code: wp.array(dtype=int),  # each particle's model: its index in the scene's models
        # controls
        Fc: wp.array2d(dtype=wp.mat33),
        control: int,
        # state in
        x_in: wp.array(dtype=wp.vec3),
        F_in: wp.array(dtype=wp.mat33),
        Jp_in: wp.array(dtype=float),
        grid_velocity_in: wp.array3d(dtype=wp.vec4),  # (v, 0) per node
        # return-mapping decisions (DecisionMode, as grid_update's; plastic models only)
        decision_mode: int,
        decisions: wp.array(dtype=wp.uint8),
        # snow's F_trial per particle, written (RECORD) or linearised at (LINEARISE): the linearised variant only
        trials: wp.array(dtype=wp.mat33),
        # state out
        x_out: wp.array(dtype=wp.vec3),
        v_out: wp.array(dtype=wp.vec3),
        F_out: wp.array(dtype=wp.mat33),
        C_out: wp.array(dtype=wp.mat33),
        Jp_out: wp.array(dtype=float),
        clamped_out: wp.array(dtype=int),
        J_min_out: wp.array(dtype=float),
    ):
        p = wp.tid()
        inv_dx = 1.0 / dx
        x = own_vec3(x_in, p)
        bx, by, bz, wx, wy, wz = stencil(x, grid_lower, inv_dx, grid_velocity_in.shape[0], grid_velocity_in.shape[1],
                                         grid_velocity_in.shape[2])
        gathered = gather(grid_velocity_in, bx, by, bz, wx, wy, wz, x, grid_lower, dx)
        v = gathered[0]
        B = wp.matrix_from_rows(gathered[1], gathered[2], gathered[3])
        C = (wp.static(inertia) * inv_dx * inv_dx) * B
        v_out[p] = v
        C_out[p] = C
        update(p, v, C, x, dt, interior_lower, interior_upper, f_blend, min_J, mu, lam, kappa, model_code, Fc, control,
               F_in, Jp_in, decision_mode, decisions, trials, x_out, F_out, Jp_out, clamped_out, J_min_out)

    return g2p


# A taped G2P's backward runs as two kernels (sim/launch.py g2p), as P2G's does: ``g2p_update``'s generated adjoint
# (everything after the gather, reading the gathered v and C from the step's output state, where the fused kernel
# stored them) and then ``g2p_gather``'s (the gather's hand-written adjoint), joined by the output state's v and C
# gradients. The fused ``g2p``'s generated adjoint replayed the 27-node gather to recompute v and C and held its
# registers through the return mapping's adjoint: one block of 256 threads per SM on an H100, 12.5 % occupancy,
# 548-588 us for 1M particles, half the backward step (ncu, BENCHMARKS.md). The forward keeps the fused kernel.


@functools.cache
def _g2p_update_kernel(models: tuple):
    update = _g2p_update_func(models, False)

    @wp.kernel(module="unique")
    def g2p_update(
        # model
        dt: float,
        interior_lower: wp.vec3,
        interior_upper: wp.vec3,
        f_blend: float,
        min_J: float,
        mu: wp.array(dtype=float),
        lam: wp.array(dtype=float),
        kappa: wp.array(dtype=wp.vec3),
        model_code: wp.array(dtype=int),
        # controls
        Fc: wp.array2d(dtype=wp.mat33),
        control: int,
        # state in, and the gathered v and C (the output state's, stored by the fused g2p)
        x_in: wp.array(dtype=wp.vec3),
        F_in: wp.array(dtype=wp.mat33),
        Jp_in: wp.array(dtype=float),
        v_in: wp.array(dtype=wp.vec3),
        C_in: wp.array(dtype=wp.mat33),
        # return-mapping decisions (as g2p's)
        decision_mode: int,
        decisions: wp.array(dtype=wp.uint8),
        trials: wp.array(dtype=wp.mat33),
        # state out (but v and C)
        x_out: wp.array(dtype=wp.vec3),
        F_out: wp.array(dtype=wp.mat33),
        Jp_out: wp.array(dtype=float),
        clamped_out: wp.array(dtype=int),
        J_min_out: wp.array(dtype=float),
    ):
        p = wp.tid()
        update(p, own_vec3(v_in, p), own_mat33(C_in, p), own_vec3(x_in, p), dt, interior_lower, interior_upper,
               f_blend, min_J, mu, lam, kappa, model_code, Fc, control, F_in, Jp_in, decision_mode, decisions, trials,
               x_out, F_out, Jp_out, clamped_out, J_min_out)

    return g2p_update


def _g2p_gather_kernel(order: str):
    inertia = BSPLINES[order][3]
    gather = TRANSFERS[order][1]
    stencil = _stencil_func(order)

    @wp.kernel(module="unique")
    def g2p_gather(
        grid_lower: wp.vec3,
        dx: float,
        x_in: wp.array(dtype=wp.vec3),
        grid_velocity_in: wp.array3d(dtype=wp.vec4),  # (v, 0) per node
        v_out: wp.array(dtype=wp.vec3),
        C_out: wp.array(dtype=wp.mat33),
    ):
        p = wp.tid()
        inv_dx = 1.0 / dx
        x = own_vec3(x_in, p)
        bx, by, bz, wx, wy, wz = stencil(x, grid_lower, inv_dx, grid_velocity_in.shape[0], grid_velocity_in.shape[1],
                                         grid_velocity_in.shape[2])
        gathered = gather(grid_velocity_in, bx, by, bz, wx, wy, wz, x, grid_lower, dx)
        v_out[p] = gathered[0]
        C_out[p] = (wp.static(inertia) * inv_dx * inv_dx) * wp.matrix_from_rows(gathered[1], gathered[2], gathered[3])

    return g2p_gather


# kernels per B-spline order and tuple of models


def _models(models) -> tuple:
    """A scene's models as a tuple of Material members (one model: a member or its name)."""
    return (models,) if isinstance(models, str) else tuple(models)


@functools.cache
def _cached(factory, order: str, models: tuple, *extra):
    return factory(order, models, *extra)


def p2g(order: str, models):
    """P2G for B-spline ``order`` and the scene's ``models`` (a tuple of models, or one), built once per pair."""
    return _cached(_p2g_kernel, order, _models(models))


def g2p(order: str, models, linearised: bool = False):
    """G2P for ``order`` and ``models``; ``linearised``: check-grad's variant that records and linearises snow's
    F_trial (_g2p_kernel)."""
    return _cached(_g2p_kernel, order, _models(models), linearised)


def p2g_affine(order: str, models):
    return _cached(_p2g_affine_kernel, order, _models(models))


def g2p_update(models):
    """G2P's part after the gather for the scene's ``models`` (any B-spline order: it reads the gathered v and C)."""
    return _g2p_update_kernel(_models(models))


g2p_gather = {order: _g2p_gather_kernel(order) for order in BSPLINES}
p2g_mass = {order: _p2g_mass_kernel(order) for order in BSPLINES}
p2g_transfer = {order: _p2g_transfer_kernel(order) for order in BSPLINES}


@wp.kernel
def nonfinite_fields(
    x: wp.array(dtype=wp.vec3),
    v: wp.array(dtype=wp.vec3),
    F: wp.array(dtype=wp.mat33),
    C: wp.array(dtype=wp.mat33),
    Jp: wp.array(dtype=float),
    row: int,
    flags: wp.array2d(dtype=int),
):
    """flags[row, f] = 1 where field f of some particle (x, v, F, C, Jp: MPMState.FIELDS) holds a NaN or an
    infinity; flags are only ever set (zero them first). One launch per checked state, inside a rollout's captured
    graph: the check that took five torch reductions per state and a host copy per rollout is one kernel a state."""
    p = wp.tid()
    if not wp.isfinite(x[p]):
        flags[row, 0] = 1
    if not wp.isfinite(v[p]):
        flags[row, 1] = 1
    if not wp.isfinite(F[p]):
        flags[row, 2] = 1
    if not wp.isfinite(C[p]):
        flags[row, 3] = 1
    if not wp.isfinite(Jp[p]):
        flags[row, 4] = 1
