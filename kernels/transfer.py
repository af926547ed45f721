"""The stencil loops of P2G and G2P as native functions with hand-written adjoints, and a particle's own loads
(kernels/mpm.py builds its transfer kernels from them)."""

import warp as wp

from ..enums import BSpline

# A particle's own entries (its state, parameters and controls) are read by its own thread only, in every transfer
# kernel: their adjoints add into the gradient without atomics. Warp's generated adjoint of ``a[p]`` adds with
# atomics (9 scalar ones per mat33), which made the stress adjoint of P2G's backward L2-bound (BENCHMARKS.md).
_OWN_ADJOINT = """
    if (adj_a.data) wp::index(adj_a, INDEX) += adj_ret;
    else if (a.grad) wp::index_grad(a, INDEX) += adj_ret;
"""


@wp.func_native("return wp::index(a, p);", adj_snippet=_OWN_ADJOINT.replace("INDEX", "p"))
def own_float(a: wp.array(dtype=float), p: int) -> float: ...


@wp.func_native("return wp::index(a, p);", adj_snippet=_OWN_ADJOINT.replace("INDEX", "p"))
def own_vec3(a: wp.array(dtype=wp.vec3), p: int) -> wp.vec3: ...


@wp.func_native("return wp::index(a, p);", adj_snippet=_OWN_ADJOINT.replace("INDEX", "p"))
def own_mat33(a: wp.array(dtype=wp.mat33), p: int) -> wp.mat33: ...


@wp.func_native("return wp::index(a, k, p);", adj_snippet=_OWN_ADJOINT.replace("INDEX", "k, p"))
def own_control(a: wp.array2d(dtype=wp.mat33), k: int, p: int) -> wp.mat33: ...


# The stencil loops of P2G and G2P as native functions with hand-written adjoints (one per B-spline width).
#
# One node's mass and momentum are one vec4 (m, p): P2G adds both with a single float4 atomic on sm_90 and later
# (CUDA 12.1+: 27 vector atomics per particle instead of 108 scalar ones), component by component elsewhere (older
# GPUs, the CPU). Measured on an H100, a P2G-like scatter of 1M particles on 128^3: 0.616 -> 0.207 ms in lattice
# order, 1.346 -> 0.353 ms shuffled (BENCHMARKS.md). G2P reads a node's velocity from a vec4 (v, 0) array (one 16-byte
# load) and its adjoint adds the node's velocity gradient with one float4 atomic likewise.
#
# Warp's generated adjoint of a kernel replays the forward and keeps every unrolled node's intermediates live for the
# reverse sweep: G2P's adjoint ran at one block per SM on an H100/H200 (registers) and spilled (BENCHMARKS.md). Here
# each loop's adjoint is one more pass over the same nodes that recomputes what it needs, so nothing per node lives
# past its iteration. With d_i = x_i - x_p (node minus particle) and w_i = wx[a] wy[b] wz[c]:
#   scatter (P2G)  (m_i, p_i) += w_i (m, mv + A d_i)
#     adjoint, from the node gradients (g_m, g_p):  adj m += sum w g_m;  adj mv += S = sum w g_p;
#     adj A += sum w g_p d_i^T;  adj x -= A^T S;  adj w_i = g_m m + g_p . (mv + A d_i)
#   gather (G2P)   v = sum w v_i,  B = sum w v_i d_i^T  (returned as rows v, B[0], B[1], B[2])
#     adjoint, from (adj v, adj B):  node gradient += w (adj v + adj B d_i);  adj x -= adj B^T v;
#     adj w_i = v_i . (adj v + adj B d_i)
# and adj w_i reaches the three weight vectors (adj wx[a] += adj w_i wy[b] wz[c], ...), whose own adjoint (the
# B-spline's, generated) carries it to x. Proven by the float64 twin (forward, VJP) and finite differences through
# the kernels (tests/test_mpm.py). The scatter's replay in an adjoint kernel adds nothing (the grid is an output only).

GATHERED = wp.types.matrix(shape=(4, 3), dtype=float)  # rows: v, then B's three rows

_NODE_LOOP = """
    for (int a = 0; a < {width}; ++a) for (int b = 0; b < {width}; ++b) for (int c = 0; c < {width}; ++c) {
        const float w = wx[a] * wy[b] * wz[c];
        const wp::vec3 d = wp::vec3(wp::float32(bx + a), wp::float32(by + b), wp::float32(bz + c)) * dx + grid_lower - x;
"""

# Warp-aggregated node adds (CUDA, sm_90+). Lanes of one warp whose stencils share their base node add to the same 27
# (64) nodes: they sum each node's value with shuffles first and one lane, the group's lowest, adds the sum with one
# float4 atomic (Westphal's "reduce_peers": a binary tree over each group of peers, whose partners are found once per
# particle from ballots and packed 6 bits a round into ``agg_sched``; Gao et al. 2018 for MPM). In lattice order a
# group is the two particles of a row that share a base; in stencil order (bench.py stencil_order) up to 8.
# Measured on an H100 (BENCHMARKS.md), 1M particles on 128^3, forward as one graph: 2.63 -> 3.31 G particle-steps/s in
# lattice order, 2.13 -> 3.28 G for shuffled particles put in stencil order; grouping by each node's address instead
# (a match per node, which also joins lanes whose stencils overlap in part) lost: 2.06 G.
_AGG_SETUP = """
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    const unsigned agg_active = __activemask();
    const int agg_lane = threadIdx.x & 31;
    const unsigned agg_peers = __match_any_sync(agg_active, ((unsigned long long)(bx & 0x1fffff) << 42) |
        ((unsigned long long)(by & 0x1fffff) << 21) | (unsigned long long)(bz & 0x1fffff));
    int agg_sched = 0, agg_rounds = 0;  // round r's partner lane + 1 (0: none) in bits 6r..6r+5
    {
        unsigned rest = agg_peers & ~(0xffffffffu >> (31 - agg_lane));  // the peers above this lane
        int rel = __popc(agg_peers & ((1u << agg_lane) - 1u));  // the peers below it
        while (__any_sync(agg_active, rest)) {
            agg_sched |= __ffs(rest) << (6 * agg_rounds);
            rest &= ~__ballot_sync(agg_active, rel & 1);  // odd positions have passed their sums on
            rel >>= 1;
            ++agg_rounds;
        }
    }
    const bool agg_leader = (agg_peers & ((1u << agg_lane) - 1u)) == 0u;
#endif
"""

_ADD_NODE_AGG = """
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
        {
            float agg_v[4] = {{value}[0], {value}[1], {value}[2], {value}[3]};
            int agg_s = agg_sched;
            for (int r = 0; r < agg_rounds; ++r, agg_s >>= 6) {
                const int partner = agg_s & 63;
                for (int q = 0; q < {count}; ++q) {
                    const float t = __shfl_sync(agg_active, agg_v[q], partner ? partner - 1 : agg_lane);
                    if (partner) agg_v[q] += t;
                }
            }
            if (agg_leader)
                atomicAdd(reinterpret_cast<float4*>(wp::address({array}, bx + a, by + b, bz + c)),
                          make_float4(agg_v[0], agg_v[1], agg_v[2], agg_v[3]));
        }
#else
        wp::atomic_add(wp::address({array}, bx + a, by + b, bz + c), {value});
#endif
"""


def _add_node(array: str, value: str, count: int) -> str:
    """A stencil loop's node add: ``array`` at the loop's node += ``value``, a vec4 whose first ``count`` components
    may be non-zero (the rest are 0 in every lane), warp-aggregated on sm_90+."""
    return _ADD_NODE_AGG.replace("{array}", array).replace("{value}", value).replace("{count}", str(count))


_SCATTER = _AGG_SETUP + _NODE_LOOP + """
        const wp::vec3 mom = w * (mv + wp::mul(affine, d));
        const wp::vec4 node = wp::vec4(w * m, mom[0], mom[1], mom[2]);
""" + _add_node("grid", "node", 4) + """
    }
"""

_ADJ_SCATTER = """
    if (!adj_grid.data) return;
    wp::vec3 sum_p(0.0f);
    float sum_m = 0.0f;
    wp::mat33 sum_pd(0.0f);
""" + _NODE_LOOP + """
        const wp::vec4 g = wp::index(adj_grid, bx + a, by + b, bz + c);
        const wp::vec3 gp = wp::vec3(g[1], g[2], g[3]);
        sum_m += w * g[0];
        sum_p += w * gp;
        sum_pd += w * wp::outer(gp, d);
        const float aw = g[0] * m + wp::dot(gp, mv + wp::mul(affine, d));
        adj_wx[a] += aw * wy[b] * wz[c];
        adj_wy[b] += aw * wx[a] * wz[c];
        adj_wz[c] += aw * wx[a] * wy[b];
    }
    adj_m += sum_m;
    adj_mv += sum_p;
    adj_affine += sum_pd;
    adj_x -= wp::mul(wp::transpose(affine), sum_p);
"""

_GATHER = """
    wp::vec3 v(0.0f);
    wp::mat33 B(0.0f);
""" + _NODE_LOOP + """
        const wp::vec4 n = wp::index(grid, bx + a, by + b, bz + c);
        const wp::vec3 vi = wp::vec3(n[0], n[1], n[2]);
        v += w * vi;
        B += w * wp::outer(vi, d);
    }
    wp::mat_t<4, 3, wp::float32> out;
    for (int j = 0; j < 3; ++j) {
        out.data[0][j] = v[j];
        for (int i = 0; i < 3; ++i) out.data[1 + i][j] = B.data[i][j];
    }
    return out;
"""

_ADJ_GATHER = """
    wp::vec3 av = wp::vec3(adj_ret.data[0][0], adj_ret.data[0][1], adj_ret.data[0][2]);
    wp::mat33 aB;
    for (int i = 0; i < 3; ++i) for (int j = 0; j < 3; ++j) aB.data[i][j] = adj_ret.data[1 + i][j];
    wp::vec3 v(0.0f);
""" + _AGG_SETUP + _NODE_LOOP + """
        const wp::vec4 n = wp::index(grid, bx + a, by + b, bz + c);
        const wp::vec3 vi = wp::vec3(n[0], n[1], n[2]);
        v += w * vi;
        const wp::vec3 g = av + wp::mul(aB, d);
        if (adj_grid.data) {
            const wp::vec4 gw = wp::vec4(w * g[0], w * g[1], w * g[2], 0.0f);
""" + _add_node("adj_grid", "gw", 3).replace("\n", "\n    ") + """
        }
        const float aw = wp::dot(vi, g);
        adj_wx[a] += aw * wy[b] * wz[c];
        adj_wy[b] += aw * wx[a] * wz[c];
        adj_wz[c] += aw * wx[a] * wy[b];
    }
    adj_x -= wp::mul(wp::transpose(aB), v);
"""


@wp.func_native(_SCATTER.replace("{width}", "3"), adj_snippet=_ADJ_SCATTER.replace("{width}", "3"), replay_snippet="")
def scatter_quadratic(grid: wp.array3d(dtype=wp.vec4), bx: int, by: int, bz: int, wx: wp.vec3, wy: wp.vec3,
                      wz: wp.vec3, x: wp.vec3, grid_lower: wp.vec3, dx: float, m: float, mv: wp.vec3,
                      affine: wp.mat33): ...


@wp.func_native(_SCATTER.replace("{width}", "4"), adj_snippet=_ADJ_SCATTER.replace("{width}", "4"), replay_snippet="")
def scatter_cubic(grid: wp.array3d(dtype=wp.vec4), bx: int, by: int, bz: int, wx: wp.vec4, wy: wp.vec4,
                  wz: wp.vec4, x: wp.vec3, grid_lower: wp.vec3, dx: float, m: float, mv: wp.vec3,
                  affine: wp.mat33): ...


@wp.func_native(_GATHER.replace("{width}", "3"), adj_snippet=_ADJ_GATHER.replace("{width}", "3"))
def gather_quadratic(grid: wp.array3d(dtype=wp.vec4), bx: int, by: int, bz: int, wx: wp.vec3, wy: wp.vec3,
                     wz: wp.vec3, x: wp.vec3, grid_lower: wp.vec3, dx: float) -> GATHERED: ...


@wp.func_native(_GATHER.replace("{width}", "4"), adj_snippet=_ADJ_GATHER.replace("{width}", "4"))
def gather_cubic(grid: wp.array3d(dtype=wp.vec4), bx: int, by: int, bz: int, wx: wp.vec4, wy: wp.vec4,
                 wz: wp.vec4, x: wp.vec3, grid_lower: wp.vec3, dx: float) -> GATHERED: ...


# per B-spline order: P2G's scatter and G2P's gather
TRANSFERS = {BSpline.QUADRATIC: (scatter_quadratic, gather_quadratic), BSpline.CUBIC: (scatter_cubic, gather_cubic)}
