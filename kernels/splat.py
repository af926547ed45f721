"""Gaussian-splat kernels with gsplat 1.5.3 semantics: projection, tile intersections, the per-pixel compositing
step (shared with kernels/raster_block.py) and the portable tile path. Launched by diffmpm_cli/render/ops.py.

Projection (differentiable through Warp's generated adjoints): world -> camera by the 4x4 view matrix (OpenCV
frame), EWA 2D covariance J Sigma_c J^T with the Jacobian's x/y clamped to 1.3 tan(fov/2) (gsplat's limits),
dilation by eps2d (in "antialiased" mode the opacity is scaled by sqrt(det Sigma_2D / det(Sigma_2D + eps2d I)) per
camera, as gsplat's), culling (depth outside [near, far], det <= 0, opacity < 1/255, box outside the image) and an
opacity-aware box radius ceil(k sqrt(Sigma_2D axis)) with k = min(3.33, sqrt(2 ln(255 opacity))). The projection
writes each (camera, Gaussian)'s opacity; compositing reads those.
Intersections: one key per (camera, 16x16 tile, Gaussian) = (camera tile id << 32) | IEEE bits of the depth,
radix-sorted. Compositing per pixel, front to back (``blend``): alpha = min(0.999, o exp(-sigma)); skip
alpha < 1/255; stop before T would fall to <= 1e-4; colour + T background. The compositing backward is
hand-written (``unblend``, back to front from the final T and the last contributing index).
"""

import warp as wp

TILE = wp.constant(16)
ALPHA_MAX = wp.constant(0.999)
# The cut-offs alpha_min (gsplat: 1/255), t_stop (1e-4) and the box's extend_max (3.33) are kernel arguments: the
# renderer passes gsplat's values; the gradient checker passes tiny ones, so that the image is continuous in the
# Gaussians and central differences converge (render/rasterize.py, RasterCutoffs).

# ----------------------------------------------------------------------------------------------------------------
# projection


@wp.func
def f64(m: wp.mat33):
    return wp.mat33d(wp.float64(m[0, 0]), wp.float64(m[0, 1]), wp.float64(m[0, 2]),
                     wp.float64(m[1, 0]), wp.float64(m[1, 1]), wp.float64(m[1, 2]),
                     wp.float64(m[2, 0]), wp.float64(m[2, 1]), wp.float64(m[2, 2]))


@wp.func
def projected_covariance(R: wp.mat33, covar: wp.mat33, j00: float, j02: float, j11: float, j12: float, eps2d: float):
    """Entries a, b, d of J R Sigma R^T J^T + eps2d I, computed in float64.

    The determinant a d - b^2 of a needle-thin Gaussian's footprint cancels catastrophically in float32 (relative
    error ~ 1e-7 times the condition number); in float64 the footprint is exact for the given float32 inputs.
    """
    Rd = f64(R)
    c = Rd * f64(covar) * wp.transpose(Rd)
    J00 = wp.float64(j00)
    J02 = wp.float64(j02)
    J11 = wp.float64(j11)
    J12 = wp.float64(j12)
    a = J00 * J00 * c[0, 0] + wp.float64(2.0) * J00 * J02 * c[0, 2] + J02 * J02 * c[2, 2]
    b = J00 * J11 * c[0, 1] + J00 * J12 * c[0, 2] + J02 * J11 * c[1, 2] + J02 * J12 * c[2, 2]
    d = J11 * J11 * c[1, 1] + wp.float64(2.0) * J11 * J12 * c[1, 2] + J12 * J12 * c[2, 2]
    return a + wp.float64(eps2d), b, d + wp.float64(eps2d)


@wp.kernel
def project(
    # inputs
    means: wp.array(dtype=wp.vec3),
    covars: wp.array(dtype=wp.mat33),
    opacities: wp.array(dtype=float),
    viewmats: wp.array(dtype=wp.mat44),
    Ks: wp.array(dtype=wp.mat33),
    width: int,
    height: int,
    near: float,
    far: float,
    eps2d: float,
    antialiased: int,
    alpha_min: float,
    extend_max: float,
    # outputs [C, N]
    means2d: wp.array2d(dtype=wp.vec2),
    conics: wp.array2d(dtype=wp.vec3d),
    depths: wp.array2d(dtype=float),
    radii: wp.array2d(dtype=wp.vec2i),
    opacities_out: wp.array2d(dtype=float),
):
    c, g = wp.tid()
    view = viewmats[c]
    K = Ks[c]
    R = wp.mat33(view[0, 0], view[0, 1], view[0, 2], view[1, 0], view[1, 1], view[1, 2], view[2, 0], view[2, 1],
                 view[2, 2])
    t = wp.vec3(view[0, 3], view[1, 3], view[2, 3])
    pc = R * means[g] + t
    z = pc[2]
    rad = wp.vec2i(0, 0)
    opacity = opacities[g]
    m2 = wp.vec2(0.0, 0.0)
    conic = wp.vec3d(wp.float64(0.0), wp.float64(0.0), wp.float64(0.0))
    if z >= near and z <= far:
        fx = K[0, 0]
        fy = K[1, 1]
        cx = K[0, 2]
        cy = K[1, 2]
        tan_x = 0.5 * float(width) / fx
        tan_y = 0.5 * float(height) / fy
        lim_x_pos = (float(width) - cx) / fx + 0.3 * tan_x
        lim_x_neg = cx / fx + 0.3 * tan_x
        lim_y_pos = (float(height) - cy) / fy + 0.3 * tan_y
        lim_y_neg = cy / fy + 0.3 * tan_y
        rz = 1.0 / z
        rz2 = rz * rz
        tx = z * wp.min(lim_x_pos, wp.max(-lim_x_neg, pc[0] * rz))
        ty = z * wp.min(lim_y_pos, wp.max(-lim_y_neg, pc[1] * rz))
        a, b, d = projected_covariance(R, covars[g], fx * rz, -fx * tx * rz2, fy * rz, -fy * ty * rz2, eps2d)
        det = a * d - b * b
        o = opacities[g]
        if antialiased != 0 and det > wp.float64(0.0):
            # the dilation's opacity compensation sqrt(det Sigma_2D / det(Sigma_2D + eps2d I)) (gsplat "antialiased",
            # Mip-Splatting): a footprint thinner than a pixel is widened by eps2d but keeps its integrated opacity
            e = wp.float64(eps2d)
            raw = (a - e) * (d - e) - b * b
            compensation = float(0.0)
            if raw > wp.float64(0.0):
                compensation = float(wp.sqrt(raw / det))
            o = o * compensation
        opacity = o
        if det > wp.float64(0.0) and o >= alpha_min:
            extend = wp.min(extend_max, wp.sqrt(2.0 * wp.log(o / alpha_min)))
            radius_x = wp.ceil(extend * wp.sqrt(float(a)))
            radius_y = wp.ceil(extend * wp.sqrt(float(d)))
            mx = fx * pc[0] * rz + cx
            my = fy * pc[1] * rz + cy
            inside = mx + radius_x > 0.0 and mx - radius_x < float(width)
            inside = inside and my + radius_y > 0.0 and my - radius_y < float(height)
            if (radius_x > 0.0 or radius_y > 0.0) and inside:
                rad = wp.vec2i(int(radius_x), int(radius_y))
                m2 = wp.vec2(mx, my)
                conic = wp.vec3d(d / det, -b / det, a / det)
    means2d[c, g] = m2
    conics[c, g] = conic
    depths[c, g] = z
    radii[c, g] = rad
    opacities_out[c, g] = opacity


# ----------------------------------------------------------------------------------------------------------------
# tile intersections


@wp.func
def tile_box(m2: wp.vec2, rad: wp.vec2i, tiles_x: int, tiles_y: int):
    """First and one-past-last tile along x and y covered by a Gaussian's box (gsplat's isect_tiles)."""
    tx = m2[0] / float(TILE)
    ty = m2[1] / float(TILE)
    rx = float(rad[0]) / float(TILE)
    ry = float(rad[1]) / float(TILE)
    x0 = wp.min(wp.max(0, int(wp.floor(tx - rx))), tiles_x)
    x1 = wp.min(wp.max(0, int(wp.ceil(tx + rx))), tiles_x)
    y0 = wp.min(wp.max(0, int(wp.floor(ty - ry))), tiles_y)
    y1 = wp.min(wp.max(0, int(wp.ceil(ty + ry))), tiles_y)
    return x0, x1, y0, y1


@wp.kernel
def count_tiles(
    means2d: wp.array2d(dtype=wp.vec2),
    radii: wp.array2d(dtype=wp.vec2i),
    tiles_x: int,
    tiles_y: int,
    counts_out: wp.array(dtype=int),
):
    c, g = wp.tid()
    n = means2d.shape[1]
    rad = radii[c, g]
    count = int(0)
    if rad[0] > 0 or rad[1] > 0:
        x0, x1, y0, y1 = tile_box(means2d[c, g], rad, tiles_x, tiles_y)
        count = (x1 - x0) * (y1 - y0)
    counts_out[c * n + g] = count


@wp.func
def depth_bits(z: float):
    """The IEEE-754 bit pattern of a positive normal float32 as an integer (monotonic in z), without a bit cast."""
    e = int(wp.floor(wp.log2(z)))
    m = z / wp.pow(2.0, float(e))
    if m >= 2.0:
        e = e + 1
        m = m * 0.5
    elif m < 1.0:
        e = e - 1
        m = m * 2.0
    return wp.int64(e + 127) * wp.int64(8388608) + wp.int64(int((m - 1.0) * 8388608.0))


@wp.kernel
def intersection_total(counts: wp.array(dtype=int), offsets: wp.array(dtype=int), total_out: wp.array(dtype=int)):
    """The number of intersections (the exclusive scan's last offset plus the last count), kept on the device."""
    n = counts.shape[0]
    total_out[0] = offsets[n - 1] + counts[n - 1]


@wp.kernel
def emit_intersections(
    means2d: wp.array2d(dtype=wp.vec2),
    radii: wp.array2d(dtype=wp.vec2i),
    depths: wp.array2d(dtype=float),
    offsets: wp.array(dtype=int),
    tiles_x: int,
    tiles_y: int,
    capacity: int,
    keys_out: wp.array(dtype=wp.int64),
    values_out: wp.array(dtype=int),
):
    """One (camera tile id << 32 | depth bits, c * N + g) pair per covered tile; pairs past ``capacity`` are dropped
    (the launcher reports that as an overflow)."""
    c, g = wp.tid()
    n = means2d.shape[1]
    rad = radii[c, g]
    if rad[0] > 0 or rad[1] > 0:
        x0, x1, y0, y1 = tile_box(means2d[c, g], rad, tiles_x, tiles_y)
        bits = depth_bits(depths[c, g])
        i = offsets[c * n + g]
        for ty in range(y0, y1):
            for tx in range(x0, x1):
                if i < capacity:
                    tile = (c * tiles_y + ty) * tiles_x + tx
                    keys_out[i] = wp.int64(tile) * wp.int64(4294967296) + bits
                    values_out[i] = c * n + g
                i += 1


@wp.kernel
def pad_intersections(total: wp.array(dtype=int), sentinel: wp.int64, keys_out: wp.array(dtype=wp.int64),
                      values_out: wp.array(dtype=int)):
    """Fill the unused tail of a fixed-capacity key buffer with a key that sorts after every tile."""
    i = wp.tid()
    if i >= total[0]:
        keys_out[i] = sentinel
        values_out[i] = 0


@wp.kernel
def tile_ranges(keys: wp.array(dtype=wp.int64), count: int, tile_count: int, starts_out: wp.array(dtype=int),
                ends_out: wp.array(dtype=int)):
    """[start, end) of every (camera, tile) in the first ``count`` sorted keys; ids >= tile_count are padding."""
    i = wp.tid()
    tile = int(keys[i] / wp.int64(4294967296))
    prev = int(-1)
    if i > 0:
        prev = int(keys[i - 1] / wp.int64(4294967296))
    if tile >= tile_count:
        if prev >= 0 and prev < tile_count:
            ends_out[prev] = i
        return
    if prev != tile:
        starts_out[tile] = i
        if prev >= 0:
            ends_out[prev] = i
    if i == count - 1:
        ends_out[tile] = count


# ----------------------------------------------------------------------------------------------------------------
# compositing: the per-pixel step shared by both raster paths (this tile path and kernels/raster_block.py)

BLENDED = wp.constant(0)  # the Gaussian was composited
SKIPPED = wp.constant(1)  # alpha < alpha_min: nothing changes
STOPPED = wp.constant(2)  # T would fall to t_stop: the pixel is finished, this Gaussian not composited


@wp.struct
class Projected:
    """The projected Gaussians as compositing reads them, per (camera, Gaussian), flattened c * N + g (each path
    takes its own form of the footprint beside: conics and radii, or principal axes)."""

    means2d: wp.array(dtype=wp.vec2)
    colors: wp.array2d(dtype=float)
    opacities: wp.array(dtype=float)
    depths: wp.array(dtype=float)


@wp.struct
class Raster:
    """What compositing walks and how: the sorted intersections (the (camera, Gaussian) of each, each (camera,
    tile)'s [start, end)), the frame, the backgrounds [C, D] and the cut-offs."""

    gaussian_ids: wp.array(dtype=int)
    tile_starts: wp.array(dtype=int)
    tile_ends: wp.array(dtype=int)
    tiles_x: int
    tiles_y: int
    width: int
    height: int
    color_channels: int
    with_depth: int
    backgrounds: wp.array2d(dtype=float)
    alpha_min: float
    t_stop: float



@wp.func
def blend(alpha: float, T: float, alpha_min: float, t_stop: float):
    """One Gaussian at one pixel, front to back: (weight alpha T, transmittance behind it, BLENDED/SKIPPED/STOPPED).

    The compositing rules in one place: skip alpha < alpha_min, stop before T would fall to <= t_stop.
    """
    if alpha < alpha_min:
        return 0.0, T, SKIPPED
    next_T = T * (1.0 - alpha)
    if next_T <= t_stop:
        return 0.0, T, STOPPED
    return alpha * T, next_T, BLENDED


@wp.func
def alpha_cotangent(dot: float, T: float, behind: float, alpha: float, T_end: float, v_a: float, bg_dot: float):
    """d loss / d alpha of one Gaussian at one pixel, in the back-to-front walk of the compositing adjoint.

    T: transmittance in front of the Gaussian; dot: v_image . its colour (and depth); behind: the sum over the
    Gaussians behind it of w_k v_image . colour_k; T_end: the pixel's final transmittance; v_a: d loss / d pixel
    alpha; bg_dot: v_image . background. Its own colour weighted by T, minus what shines through from behind, and
    the alpha and background terms through T_end.
    """
    one_minus = 1.0 - alpha
    return dot * T - behind / one_minus + T_end / one_minus * (v_a - bg_dot)


@wp.func
def exponent_cotangents(opacity: float, sigma: float, v_alpha: float):
    """(d loss / d sigma, d loss / d opacity) through alpha = min(0.999, o exp(-sigma)); both 0 where clamped."""
    vis = wp.exp(-sigma)
    if opacity * vis <= ALPHA_MAX:
        return -opacity * vis * v_alpha, vis * v_alpha
    return 0.0, 0.0


@wp.func
def unblend(alpha: float, sigma: float, opacity: float, dot: float, T_behind: float, behind: float, T_end: float,
            v_a: float, bg_dot: float):
    """The adjoint of ``blend`` for a composited Gaussian, back to front from the pixel's final transmittance:
    (T in front of it, its weight alpha T, ``behind`` including it, d loss / d sigma, d loss / d opacity).

    dot: v_image . its colour (and depth); T_behind: the transmittance behind it; the rest as in alpha_cotangent.
    """
    T = T_behind / (1.0 - alpha)
    w = alpha * T
    v_alpha = alpha_cotangent(dot, T, behind, alpha, T_end, v_a, bg_dot)
    v_sigma, v_o = exponent_cotangents(opacity, sigma, v_alpha)
    return T, w, behind + w * dot, v_sigma, v_o


# ----------------------------------------------------------------------------------------------------------------
# the portable (CPU) path: one thread per tile, Gaussian-major inside the tile, touching only the pixels of each
# Gaussian's box; the per-pixel state lives in the output/scratch arrays. The exponent is evaluated in float64.


@wp.func
def gaussian_alpha(m2: wp.vec2, conic: wp.vec3d, opacity: float, px: float, py: float):
    """(alpha, sigma, dx, dy) of a Gaussian at a pixel centre, before the skip test.

    sigma is evaluated in float64 from a float64 conic: for a needle-thin footprint its terms cancel by orders of
    magnitude, and float32 coefficients would put ~1e-4 errors into alpha.
    """
    dx = wp.float64(m2[0] - px)
    dy = wp.float64(m2[1] - py)
    sigma = float(wp.float64(0.5) * (conic[0] * dx * dx + conic[2] * dy * dy) + conic[1] * dx * dy)
    alpha = wp.min(ALPHA_MAX, opacity * wp.exp(-sigma))
    return alpha, sigma, float(dx), float(dy)


@wp.func
def box_pixels(m: float, rad: int, lo: int, hi: int):
    """Pixel indices [first, last] in [lo, hi) whose centres lie within m -+ rad (empty when first > last)."""
    first = wp.max(lo, int(wp.ceil(m - float(rad) - 0.5)))
    last = wp.min(hi - 1, int(wp.floor(m + float(rad) - 0.5)))
    return first, last


@wp.kernel
def rasterize_forward_tiles(
    proj: Projected,
    conics: wp.array(dtype=wp.vec3d),  # per (camera, Gaussian), like proj
    radii: wp.array(dtype=wp.vec2i),
    raster: Raster,
    # out, per pixel, flattened (c * H + i) * W + j (image_out zeroed: it is accumulated)
    image_out: wp.array2d(dtype=float),
    alpha_out: wp.array(dtype=float),
    T_out: wp.array(dtype=float),
    last_out: wp.array(dtype=int),
    done_scratch: wp.array(dtype=int),
):
    c, ty, tx = wp.tid()
    tile = (c * raster.tiles_y + ty) * raster.tiles_x + tx
    D = raster.color_channels
    x0 = tx * TILE
    y0 = ty * TILE
    x1 = wp.min(x0 + TILE, raster.width)
    y1 = wp.min(y0 + TILE, raster.height)
    for i in range(y0, y1):
        for j in range(x0, x1):
            pix = (c * raster.height + i) * raster.width + j
            T_out[pix] = 1.0
            last_out[pix] = -1
            done_scratch[pix] = 0
    for k in range(raster.tile_starts[tile], raster.tile_ends[tile]):
        idx = raster.gaussian_ids[k]
        m2 = proj.means2d[idx]
        rad = radii[idx]
        o = proj.opacities[idx]
        j_lo, j_hi = box_pixels(m2[0], rad[0], x0, x1)
        i_lo, i_hi = box_pixels(m2[1], rad[1], y0, y1)
        for i in range(i_lo, i_hi + 1):
            for j in range(j_lo, j_hi + 1):
                pix = (c * raster.height + i) * raster.width + j
                if done_scratch[pix] != 0:
                    continue
                alpha, sigma, dx, dy = gaussian_alpha(m2, conics[idx], o, float(j) + 0.5, float(i) + 0.5)
                if sigma < 0.0:
                    continue
                w, next_T, state = blend(alpha, T_out[pix], raster.alpha_min, raster.t_stop)
                if state == STOPPED:
                    done_scratch[pix] = 1
                elif state == BLENDED:
                    for d in range(D):
                        image_out[pix, d] = image_out[pix, d] + w * proj.colors[idx, d]
                    if raster.with_depth != 0:
                        image_out[pix, D] = image_out[pix, D] + w * proj.depths[idx]
                    last_out[pix] = k
                    T_out[pix] = next_T
    for i in range(y0, y1):
        for j in range(x0, x1):
            pix = (c * raster.height + i) * raster.width + j
            T = T_out[pix]
            for d in range(D):
                image_out[pix, d] = image_out[pix, d] + T * raster.backgrounds[c, d]
            alpha_out[pix] = 1.0 - T


@wp.kernel
def rasterize_backward_tiles(
    proj: Projected,
    conics: wp.array(dtype=wp.vec3d),  # per (camera, Gaussian), like proj
    radii: wp.array(dtype=wp.vec2i),
    raster: Raster,
    # the forward's per-pixel final transmittance and last composited entry
    T_final: wp.array(dtype=float),
    last: wp.array(dtype=int),
    # gradients of the outputs
    v_image: wp.array2d(dtype=float),
    v_alpha_out: wp.array(dtype=float),
    # per-pixel scratch
    T_scratch: wp.array(dtype=float),
    behind_scratch: wp.array(dtype=float),
    bg_scratch: wp.array(dtype=float),
    # gradients of the inputs (accumulated)
    v_means2d: wp.array(dtype=wp.vec2),
    v_conics: wp.array(dtype=wp.vec3d),
    v_colors: wp.array2d(dtype=float),
    v_opacities: wp.array(dtype=float),
    v_depths: wp.array(dtype=float),
    v_backgrounds: wp.array2d(dtype=float),
):
    c, ty, tx = wp.tid()
    tile = (c * raster.tiles_y + ty) * raster.tiles_x + tx
    D = raster.color_channels
    x0 = tx * TILE
    y0 = ty * TILE
    x1 = wp.min(x0 + TILE, raster.width)
    y1 = wp.min(y0 + TILE, raster.height)
    k_max = int(-1)
    for i in range(y0, y1):
        for j in range(x0, x1):
            pix = (c * raster.height + i) * raster.width + j
            T_scratch[pix] = T_final[pix]
            behind_scratch[pix] = 0.0
            bg_dot = float(0.0)
            for d in range(D):
                bg_dot += raster.backgrounds[c, d] * v_image[pix, d]
                wp.atomic_add(v_backgrounds, c, d, T_final[pix] * v_image[pix, d])
            bg_scratch[pix] = bg_dot
            k_max = wp.max(k_max, last[pix])
    for k in range(k_max, raster.tile_starts[tile] - 1, -1):
        idx = raster.gaussian_ids[k]
        m2 = proj.means2d[idx]
        rad = radii[idx]
        q = conics[idx]
        o = proj.opacities[idx]
        j_lo, j_hi = box_pixels(m2[0], rad[0], x0, x1)
        i_lo, i_hi = box_pixels(m2[1], rad[1], y0, y1)
        g_m2 = wp.vec2(0.0, 0.0)
        g_conic = wp.vec3d(wp.float64(0.0), wp.float64(0.0), wp.float64(0.0))
        g_opacity = float(0.0)
        g_depth = float(0.0)
        for i in range(i_lo, i_hi + 1):
            for j in range(j_lo, j_hi + 1):
                pix = (c * raster.height + i) * raster.width + j
                if k > last[pix]:
                    continue
                alpha, sigma, dx, dy = gaussian_alpha(m2, q, o, float(j) + 0.5, float(i) + 0.5)
                if sigma >= 0.0 and alpha >= raster.alpha_min:
                    dot = float(0.0)
                    for d in range(D):
                        dot += proj.colors[idx, d] * v_image[pix, d]
                    if raster.with_depth != 0:
                        dot += proj.depths[idx] * v_image[pix, D]
                    T, w, behind, v_sigma, v_o = unblend(alpha, sigma, o, dot, T_scratch[pix], behind_scratch[pix],
                                                         T_final[pix], v_alpha_out[pix], bg_scratch[pix])
                    T_scratch[pix] = T
                    behind_scratch[pix] = behind
                    for d in range(D):
                        wp.atomic_add(v_colors, idx, d, w * v_image[pix, d])
                    if raster.with_depth != 0:
                        g_depth += w * v_image[pix, D]
                    vs = wp.float64(v_sigma)
                    ddx = wp.float64(dx)
                    ddy = wp.float64(dy)
                    g_conic += wp.vec3d(wp.float64(0.5) * vs * ddx * ddx, vs * ddx * ddy,
                                        wp.float64(0.5) * vs * ddy * ddy)
                    g_m2 += wp.vec2(float(vs * (q[0] * ddx + q[1] * ddy)), float(vs * (q[1] * ddx + q[2] * ddy)))
                    g_opacity += v_o
        wp.atomic_add(v_means2d, idx, g_m2)
        wp.atomic_add(v_conics, idx, g_conic)
        wp.atomic_add(v_opacities, idx, g_opacity)
        if raster.with_depth != 0:
            wp.atomic_add(v_depths, idx, g_depth)
