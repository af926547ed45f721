"""The GPU compositing path: one 256-thread block per 16x16 tile, one thread per pixel, shared-memory batches.

Same semantics as the portable tile path in splat.py, whose per-pixel step (``blend`` forward, ``unblend`` backward:
the 0.999 clamp, the alpha_min skip, the t_stop stop) it shares, and the same background term. The exponent is
evaluated in float32 from the conic's principal axes (conic_axes) instead of from a float64 conic, with the same
accuracy. What else differs is the memory traffic:

- each batch of BLOCK consecutive entries of the tile's sorted list is gathered once into shared memory
  (tile_load_indexed), then every pixel thread walks it from there;
- the forward leaves a batch loop when every pixel of the block has stopped (one block reduction per batch);
- the backward walks the batches back to front from the block's largest last index. Each Gaussian's gradient
  (16 slots: colour, mean, conic, opacity, depth) is summed over the 32 pixels of a warp by a transposing
  reduction (16 register shuffles in all), after which 11 lanes each make one atomic add into a packed
  per-Gaussian row; warps where no pixel saw the Gaussian skip it. The background gradient is summed over the
  block before its atomic add.

On the CPU (only with ``wp.config.enable_cpu_blocks``, used by the tests) each lane acts as a warp of one and adds
its own slots, so the same kernel gives the same sums.
"""

import warp as wp

from .splat import ALPHA_MAX, SKIPPED, STOPPED, TILE, Projected, Raster, blend, unblend

wp.set_module_options({"enable_backward": False})  # hand-written adjoints only; nothing here is taped

BLOCK = wp.constant(256)  # TILE * TILE pixels per block, and Gaussians per shared-memory batch
# Registers per thread the compositing kernels may use on CUDA (``__maxnreg__``; ignored on the CPU): uncapped, nvcc
# gave the forward 90 and the backward 96, two 256-thread blocks per SM (25 % occupancy, ncu). At 64 both run four
# blocks, with 80 / 168 bytes of spill stores (ptxas) that the occupancy more than pays for: on an H100 at 100k
# Gaussians on 1024^2 the forward 0.52 -> 0.37 ms, the backward 1.22 -> 0.97 ms (80 for the backward: 1.05 ms).
# BENCHMARKS.md has the runs.
FORWARD_REGISTERS = 64
BACKWARD_REGISTERS = 64
SLOTS = wp.constant(16)  # per-Gaussian gradient slots: colour 0-3, mean2d 4-5, conic 6-8, opacity 9, depth 10
vec16 = wp.types.vector(length=16, dtype=float)


@wp.func_native("""
#if defined(__CUDA_ARCH__)
float a[16];
#pragma unroll
for (int i = 0; i < 16; ++i) a[i] = v.c[i];
// recursive halving: at each exchange a lane keeps half of its slots and receives its partner's sum of them,
// so 16 values are summed over the warp with 16 shuffles instead of 80; lane l ends with slot (l >> 1) & 15.
// Every index is a compile-time constant (one expansion per level; both slots read before a select of values), so
// a[] lives in registers: a loop over the levels (two induction variables) was not unrolled and a select of
// a[i] and a[i + n / 2] indexed a[] dynamically, which put it in local memory (ncu: ~35 local loads and ~14 local
// stores per pixel and Gaussian in the backward, L2 80 % busy with them)
#define DIFFMPM_HALVE(M) { \
    const bool upper = (lane & (M)) != 0; \
    _Pragma("unroll") \
    for (int i = 0; i < (M) / 2; ++i) { \
        const float low = a[i]; \
        const float high = a[i + (M) / 2]; \
        a[i] = (upper ? high : low) + __shfl_xor_sync(0xffffffff, upper ? low : high, (M)); \
    } \
}
DIFFMPM_HALVE(16) DIFFMPM_HALVE(8) DIFFMPM_HALVE(4) DIFFMPM_HALVE(2)
#undef DIFFMPM_HALVE
return a[0] + __shfl_xor_sync(0xffffffff, a[0], 1);
#else
return v.c[0];
#endif
""")
def warp_slot_sum(v: vec16, lane: int) -> float: ...


@wp.func_native("""
#if defined(__CUDA_ARCH__)
return __any_sync(0xffffffff, flag);
#else
return flag;
#endif
""")
def warp_any(flag: int) -> int: ...


@wp.func_native("""
#if defined(__CUDA_ARCH__)
return 1;
#else
return 0;
#endif
""")
def warp_lanes() -> int: ...


@wp.func
def add_warp_sum(grads: wp.array(dtype=float), row: int, s: float, lane: int, used: int):
    """CUDA: after warp_slot_sum (lane l holds the warp's sum of slot (l >> 1) & 15), the even lanes add one slot
    each to row ``row`` of ``grads`` ([rows, SLOTS] flat)."""
    slot = (lane >> 1) & 15
    if (lane & 1) == 0 and slot < used and s != 0.0:
        wp.atomic_add(grads, row * SLOTS + slot, s)


@wp.func
def add_lane(grads: wp.array(dtype=float), row: int, g: vec16, used: int):
    """CPU (every lane its own warp): add this lane's non-zero slots to row ``row`` of ``grads``."""
    for slot in range(16):  # a constant trip count: unrolled, g is never indexed dynamically
        if slot < used and g[slot] != 0.0:
            wp.atomic_add(grads, row * SLOTS + slot, g[slot])


@wp.kernel
def conic_axes(conics: wp.array(dtype=wp.vec3d), axes_out: wp.array(dtype=wp.vec4)):
    """The conic [[a, b], [b, c]] as its principal axes (ux, uy, l1, l2), conic = l1 u u^T + l2 v v^T with
    v = (-uy, ux), l1 >= l2 >= 0; computed in float64, stored in float32.

    sigma = (l1 p^2 + l2 q^2) / 2 with p = u.d, q = v.d is a sum of non-negative terms, so it is accurate in float32
    where a dx^2 + 2 b dx dy + c dy^2 cancels for needle-thin footprints (which is why the portable kernels use a
    float64 conic). Eigenvalues are bounded by 1 / eps2d, so a rounding of u by ~6e-8 rad moves alpha by at most
    ~sqrt(l1) |d| 6e-8 ~ 2e-5 even 300 px along a needle.
    """
    i = wp.tid()
    q = conics[i]
    a = q[0]
    b = q[1]
    c = q[2]
    half = wp.float64(0.5)
    r = wp.sqrt(half * half * (a - c) * (a - c) + b * b)
    l1 = half * (a + c) + r
    l2 = wp.float64(0.0)
    ux = wp.float64(1.0)
    uy = wp.float64(0.0)
    if l1 > wp.float64(0.0):
        l2 = wp.max(wp.float64(0.0), (a * c - b * b) / l1)
        # the eigenvector of l1 from whichever row of (conic - l1 I) is better conditioned
        x1 = b
        y1 = l1 - a
        x2 = l1 - c
        y2 = b
        n1 = x1 * x1 + y1 * y1
        n2 = x2 * x2 + y2 * y2
        if n1 >= n2 and n1 > wp.float64(0.0):
            ux = x1 / wp.sqrt(n1)
            uy = y1 / wp.sqrt(n1)
        elif n2 > wp.float64(0.0):
            ux = x2 / wp.sqrt(n2)
            uy = y2 / wp.sqrt(n2)
        # else b = 0 and a = c: isotropic, any unit u will do
    axes_out[i] = wp.vec4(float(ux), float(uy), float(l1), float(l2))


@wp.func
def axes_alpha(m2: wp.vec2, ax: wp.vec4, opacity: float, px: float, py: float):
    """(alpha, sigma, dx, dy, p, q) of a Gaussian at a pixel centre from its principal axes (conic_axes), float32:
    d = mean - pixel centre, p = u.d, q = v.d."""
    dx = m2[0] - px
    dy = m2[1] - py
    p = ax[0] * dx + ax[1] * dy
    q = ax[0] * dy - ax[1] * dx
    sigma = 0.5 * (ax[2] * p * p + ax[3] * q * q)
    alpha = wp.min(ALPHA_MAX, opacity * wp.exp(-sigma))
    return alpha, sigma, dx, dy, p, q


@wp.func
def block_pixel(block: int, lane: int, raster: Raster):
    """(camera, flat pixel index, inside the image, pixel centre x, y) of a block's lane: blocks enumerate
    (camera, tile row, tile column), lanes the tile's pixels row by row."""
    per_camera = raster.tiles_x * raster.tiles_y
    c = block / per_camera
    r = block - c * per_camera
    ty = r / raster.tiles_x
    tx = r - ty * raster.tiles_x
    i = ty * TILE + lane / TILE
    j = tx * TILE + lane - (lane / TILE) * TILE
    inside = i < raster.height and j < raster.width
    return c, (c * raster.height + i) * raster.width + j, inside, float(j) + 0.5, float(i) + 0.5


@wp.kernel(cuda_max_registers=FORWARD_REGISTERS)
def rasterize_forward_block(
    proj: Projected,
    axes: wp.array(dtype=wp.vec4),  # per (camera, Gaussian), like proj: conic_axes
    raster: Raster,
    # out, per pixel, flattened (c * H + i) * W + j (image_out zeroed when color_channels > 4)
    image_out: wp.array2d(dtype=float),
    alpha_out: wp.array(dtype=float),
    T_out: wp.array(dtype=float),
    last_out: wp.array(dtype=int),
):
    block, lane = wp.tid()
    c, pix, inside, px, py = block_pixel(block, lane, raster)
    D = raster.color_channels
    T = float(1.0)
    last = int(-1)
    acc = wp.vec4(0.0)
    depth_acc = float(0.0)
    done = int(0)
    if not inside:
        done = 1
    b = raster.tile_starts[block]
    end = raster.tile_ends[block]
    while b < end:
        stopped = wp.tile_sum(wp.tile(done))
        if stopped[0] == BLOCK:
            break
        ids = wp.tile_load(raster.gaussian_ids, shape=BLOCK, offset=b, storage="shared")
        t_m2 = wp.tile_load_indexed(proj.means2d, indices=ids, shape=(BLOCK,), offset=(0,), axis=0, storage="shared")
        t_ax = wp.tile_load_indexed(axes, indices=ids, shape=(BLOCK,), offset=(0,), axis=0, storage="shared")
        t_o = wp.tile_load_indexed(proj.opacities, indices=ids, shape=(BLOCK,), offset=(0,), axis=0, storage="shared")
        t_rgb = wp.tile_load_indexed(proj.colors, indices=ids, shape=(BLOCK, 4), offset=(0, 0), axis=0, storage="shared")
        n = wp.min(BLOCK, end - b)
        if done == 0:
            for kk in range(n):
                alpha, sigma, dx, dy, p, q = axes_alpha(wp.tile_extract(t_m2, kk), wp.tile_extract(t_ax, kk),
                                                        wp.tile_extract(t_o, kk), px, py)
                w, next_T, state = blend(alpha, T, raster.alpha_min, raster.t_stop)
                if state == SKIPPED:
                    continue
                if state == STOPPED:
                    done = 1
                    break
                acc += w * wp.vec4(wp.tile_extract(t_rgb, kk, 0), wp.tile_extract(t_rgb, kk, 1),
                                   wp.tile_extract(t_rgb, kk, 2), wp.tile_extract(t_rgb, kk, 3))
                if D > 4:
                    idx = wp.tile_extract(ids, kk)
                    for d in range(4, D):
                        image_out[pix, d] = image_out[pix, d] + w * proj.colors[idx, d]
                if raster.with_depth != 0:
                    depth_acc += w * proj.depths[wp.tile_extract(ids, kk)]
                last = b + kk
                T = next_T
        b += BLOCK
    if inside:
        for d in range(4):  # constant trip count: acc stays in registers
            if d < D:
                image_out[pix, d] = acc[d] + T * raster.backgrounds[c, d]
        for d in range(4, D):
            image_out[pix, d] = image_out[pix, d] + T * raster.backgrounds[c, d]
        if raster.with_depth != 0:
            image_out[pix, D] = depth_acc
        alpha_out[pix] = 1.0 - T
        T_out[pix] = T
        last_out[pix] = last


@wp.kernel(cuda_max_registers=BACKWARD_REGISTERS)
def rasterize_backward_block(
    proj: Projected,
    axes: wp.array(dtype=wp.vec4),  # per (camera, Gaussian), like proj: conic_axes
    raster: Raster,
    # the forward's per-pixel final transmittance and last composited entry
    T_final: wp.array(dtype=float),
    last: wp.array(dtype=int),
    # gradients of the outputs
    v_image: wp.array2d(dtype=float),
    v_alpha_out: wp.array(dtype=float),
    # gradients of the inputs (accumulated): per (camera, Gaussian) gradient slots [C*N, SLOTS] flat (see SLOTS),
    # colour channels past 4 [C*N, D] flat
    v_slots: wp.array(dtype=float),
    v_colors_rest: wp.array(dtype=float),
    v_backgrounds: wp.array2d(dtype=float),
):
    block, lane = wp.tid()
    c, pix, inside, px, py = block_pixel(block, lane, raster)
    D = raster.color_channels
    used = 10 + raster.with_depth  # slots in use
    T_end = float(1.0)
    v_a = float(0.0)
    my_last = int(-1)
    v_rgb = wp.vec4(0.0)
    v_dep = float(0.0)
    bg_dot = float(0.0)
    if inside:
        T_end = T_final[pix]
        v_a = v_alpha_out[pix]
        my_last = last[pix]
        for d in range(D):
            bg_dot += raster.backgrounds[c, d] * v_image[pix, d]
        for d in range(4):  # constant trip count: v_rgb stays in registers (a dynamic index puts it in local memory)
            if d < D:
                v_rgb[d] = v_image[pix, d]
        if raster.with_depth != 0:
            v_dep = v_image[pix, D]
    # the background's gradient: T_end v_image summed over the block, one atomic add per channel
    for d in range(D):
        g_bg = float(0.0)
        if inside:
            g_bg = T_end * v_image[pix, d]
        total = wp.tile_sum(wp.tile(g_bg))
        if lane == 0:
            wp.atomic_add(v_backgrounds, c, d, total[0])
    T = T_end
    behind = float(0.0)
    start = raster.tile_starts[block]
    hi = wp.tile_max(wp.tile(my_last))[0] + 1
    while hi > start:
        lo = wp.max(start, hi - BLOCK)
        ids = wp.tile_load(raster.gaussian_ids, shape=BLOCK, offset=lo, storage="shared")
        t_m2 = wp.tile_load_indexed(proj.means2d, indices=ids, shape=(BLOCK,), offset=(0,), axis=0, storage="shared")
        t_ax = wp.tile_load_indexed(axes, indices=ids, shape=(BLOCK,), offset=(0,), axis=0, storage="shared")
        t_o = wp.tile_load_indexed(proj.opacities, indices=ids, shape=(BLOCK,), offset=(0,), axis=0, storage="shared")
        t_rgb = wp.tile_load_indexed(proj.colors, indices=ids, shape=(BLOCK, 4), offset=(0, 0), axis=0, storage="shared")
        for kk in range(hi - lo - 1, -1, -1):
            k = lo + kk
            idx = wp.tile_extract(ids, kk)
            m2 = wp.tile_extract(t_m2, kk)
            ax = wp.tile_extract(t_ax, kk)
            o = wp.tile_extract(t_o, kk)
            valid = int(0)
            g = vec16()
            if k <= my_last:
                alpha, sigma, dx, dy, p, q = axes_alpha(m2, ax, o, px, py)
                if alpha >= raster.alpha_min:
                    valid = 1
                    dot = float(0.0)
                    for d in range(4):
                        dot += v_rgb[d] * wp.tile_extract(t_rgb, kk, d)
                    for d in range(4, D):
                        dot += proj.colors[idx, d] * v_image[pix, d]
                    if raster.with_depth != 0:
                        dot += proj.depths[idx] * v_dep
                    T, w, behind, vs, v_o = unblend(alpha, sigma, o, dot, T, behind, T_end, v_a, bg_dot)
                    for d in range(4):
                        g[d] = w * v_rgb[d]
                    for d in range(4, D):
                        wp.atomic_add(v_colors_rest, idx * D + d, w * v_image[pix, d])
                    if raster.with_depth != 0:
                        g[10] = w * v_dep
                    g[9] = v_o
                    # d sigma / d mean2d = conic d = l1 p u + l2 q v
                    g[4] = vs * (ax[2] * p * ax[0] - ax[3] * q * ax[1])
                    g[5] = vs * (ax[2] * p * ax[1] + ax[3] * q * ax[0])
                    g[6] = 0.5 * vs * dx * dx
                    g[7] = vs * dx * dy
                    g[8] = 0.5 * vs * dy * dy
            # the gradient slots never pass through a function call with g by value on CUDA: a call nvcc did not
            # inline put g in local memory (ncu: ~14 local stores and ~35 local loads per pixel and Gaussian)
            if warp_any(valid) != 0:
                if warp_lanes() != 0:
                    add_warp_sum(v_slots, idx, warp_slot_sum(g, lane), lane, used)
                else:
                    add_lane(v_slots, idx, g, used)
        hi = lo
