"""The box of grid nodes a step's particles reach (the grid update visits it alone: kernels/mpm.py grid_update)."""

import functools

import warp as wp

from .mpm import BSPLINES, _stencil_func, box_count, box_node, box_nodes

# The grid update visits only the nodes inside the box of the particles' stencils (every other node has no mass and no
# particle reads its velocity): a body fills a few per cent of most grids (1M particles in 128^3: 6 %), and the dense
# update read and wrote every node. A grid's box array holds 6 ints (min base x, y, z, -max base x, y, z: all kept by
# min) and then BOX_SLOTS slots of 6: ``particle_box`` reduces each warp's stencil bases (sm_80+) and adds them to its
# warp's slot (so that no address takes more than a few dozen atomics: 6 addresses for all warps took 0.19 ms at 1M
# particles on an H100), ``box_reduce`` reduces the slots into the first 6; the grid's zero_() fills it with BOX_EMPTY.

BOX_EMPTY = wp.constant(2**31 - 1)
BOX_SLOTS = wp.constant(512)  # a multiple of 32: box_reduce's warps each read one coordinate's slots
WIDEST = max(spline[0] for spline in BSPLINES.values())  # clear_box clears that far from the box's bases

_WARP_MIN = """
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    const unsigned mask = __activemask();
    const int least = __reduce_min_sync(mask, value);
    if ((threadIdx.x & 31) == __ffs(mask) - 1) atomicMin(wp::address(a, index), least);
#else
    wp::atomic_min(wp::address(a, index), value);
#endif
"""


@wp.func_native(_WARP_MIN, adj_snippet="", replay_snippet="")
def warp_min(a: wp.array(dtype=int), index: int, value: int):
    """a[index] = min(a[index], value) for every lane; ``index`` must be the same across the warp's active lanes."""
    ...


@functools.cache
def particle_box(order: str):
    stencil = _stencil_func(order)

    @wp.kernel(module="unique")
    def particle_box(
        # model
        grid_lower: wp.vec3,
        dx: float,
        shape: wp.vec3i,
        # state in
        x_in: wp.array(dtype=wp.vec3),
        # out: the box's slots (see above)
        box_out: wp.array(dtype=int),
    ):
        p = wp.tid()
        # 1 / dx in float32 on the device, as the transfer kernels compute it: the host's float32(1 / dx) differs by
        # an ulp for many grids (1/15, 1/72), which moved a particle on a base boundary to another base than P2G's
        # and let P2G write a node outside the box (then never cleared, nor updated)
        bx, by, bz, wx, wy, wz = stencil(x_in[p], grid_lower, 1.0 / dx, shape[0], shape[1], shape[2])
        slot = 6 + 6 * ((p // 32) % BOX_SLOTS)  # one slot per warp of particles (p // 32 is the warp's)
        warp_min(box_out, slot, bx)
        warp_min(box_out, slot + 1, by)
        warp_min(box_out, slot + 2, bz)
        warp_min(box_out, slot + 3, -bx)
        warp_min(box_out, slot + 4, -by)
        warp_min(box_out, slot + 5, -bz)

    return particle_box


@wp.kernel
def box_reduce(box: wp.array(dtype=int)):
    """The slots into the box, over 6 x BOX_SLOTS threads: thread tid takes coordinate tid // BOX_SLOTS of slot
    tid % BOX_SLOTS."""
    tid = wp.tid()
    a = tid // BOX_SLOTS
    warp_min(box, a, box[6 + 6 * (tid % BOX_SLOTS) + a])


@wp.kernel
def clear_box(
    box: wp.array(dtype=int),
    width: int,
    threads: int,
    arrays: int,
    a: wp.array3d(dtype=wp.vec4),
    b: wp.array3d(dtype=wp.vec4),
    c: wp.array3d(dtype=wp.vec4),
):
    """Zero the nodes of ``box`` (a grid's last box: every node P2G, the grid update and their adjoints wrote lies in
    it, up to ``width`` nodes from its bases) in the first ``arrays`` of a, b, c (1 or 3): a grid is cleared for its
    next step without a memset of every node (MPMGrid.zero_). Launched over ``threads`` threads, each taking every
    ``threads``-th node of the box: BOX_THREADS on CUDA (a launch over every node, returning outside the box, took
    17 us on 128^3 on an H100: as long as the memset it replaced), 1 on the CPU (one loop, no per-thread calls). An
    empty box (BOX_EMPTY) clears nothing."""
    tid = wp.tid()
    lo, hi = box_nodes(box, width, wp.vec3i(a.shape[0], a.shape[1], a.shape[2]))
    for n in range(tid, box_count(lo, hi), threads):
        i, j, k = box_node(lo, hi, n)
        a[i, j, k] = wp.vec4(0.0)
        if arrays > 1:
            b[i, j, k] = wp.vec4(0.0)
            c[i, j, k] = wp.vec4(0.0)
