"""Particles on a regular lattice inside a watertight mesh.

The containment test casts one ray per lattice column along +z and counts crossings above each lattice point
(parity), all vectorised in numpy: O(triangles x columns they cover + points), independent of the number of
points per column. Rays are offset by a tiny irrational fraction of the spacing so that none passes exactly
through a mesh edge or vertex of shapes aligned with the lattice.
"""

from __future__ import annotations

import numpy as np
import trimesh

_RAY_OFFSET = (1.2345678901e-6, 2.7182818284e-6)  # fractions of the spacing


def lattice_axis(lo: float, hi: float, origin: float, spacing: float) -> np.ndarray:
    """Lattice coordinates ``origin + (m + 1/2) spacing`` that fall inside [lo, hi]."""
    first = int(np.ceil((lo - origin) / spacing - 0.5))
    last = int(np.floor((hi - origin) / spacing - 0.5))
    return origin + (np.arange(first, last + 1) + 0.5) * spacing


def inside_lattice(mesh: trimesh.Trimesh, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """Boolean [len(xs), len(ys), len(zs)]: which lattice points lie inside the closed mesh."""
    inside = np.zeros((len(xs), len(ys), len(zs)), dtype=bool)
    if min(len(xs), len(ys), len(zs)) == 0:
        return inside
    spacing = float(xs[1] - xs[0]) if len(xs) > 1 else 1.0
    rays_x, rays_y = xs + _RAY_OFFSET[0] * spacing, ys + _RAY_OFFSET[1] * spacing
    tri = np.asarray(mesh.triangles, dtype=np.float64)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    # columns each triangle's xy bounding box covers
    lo, hi = tri.min(axis=1), tri.max(axis=1)
    ix0, ix1 = np.searchsorted(rays_x, lo[:, 0], "left"), np.searchsorted(rays_x, hi[:, 0], "right")
    iy0, iy1 = np.searchsorted(rays_y, lo[:, 1], "left"), np.searchsorted(rays_y, hi[:, 1], "right")
    nx_t, ny_t = np.maximum(ix1 - ix0, 0), np.maximum(iy1 - iy0, 0)
    counts = nx_t * ny_t
    total = int(counts.sum())
    if total == 0:
        return inside
    tri_id = np.repeat(np.arange(len(tri)), counts)
    local = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    ix = ix0[tri_id] + local // ny_t[tri_id]
    iy = iy0[tri_id] + local % ny_t[tri_id]
    px, py = rays_x[ix], rays_y[iy]
    # 2D barycentric coordinates of the ray in the triangle's xy projection
    ta, tb, tc = a[tri_id], b[tri_id], c[tri_id]
    e1, e2 = tb - ta, tc - ta
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    wx, wy = px - ta[:, 0], py - ta[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (wx * e2[:, 1] - wy * e2[:, 0]) / det
        t = (e1[:, 0] * wy - e1[:, 1] * wx) / det
        hit = (det != 0) & (s >= 0) & (t >= 0) & (s + t <= 1)
    z_hit = (ta[:, 2] + s * e1[:, 2] + t * e2[:, 2])[hit]
    column = (ix * len(ys) + iy)[hit]
    # count crossings above each lattice point: sort hits by (column, z) through one composite key
    z_lo, z_span = min(zs[0], z_hit.min()), max(zs[-1], z_hit.max()) - min(zs[0], z_hit.min())
    scale = 1.0 / (z_span * (1.0 + 1e-9) + 1e-300)
    hit_key = np.sort(column + (z_hit - z_lo) * scale)
    end = np.searchsorted(hit_key, np.arange(len(xs) * len(ys)) + 1.0, "left")
    point_key = np.arange(len(xs) * len(ys))[:, None] + (zs[None, :] - z_lo) * scale
    above = end[:, None] - np.searchsorted(hit_key, point_key.ravel(), "right").reshape(point_key.shape)
    return (above % 2 == 1).reshape(inside.shape)


def lattice_particles(mesh: trimesh.Trimesh, *, origin, spacing: float, jitter: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Positions [N, 3] (float64, m) of the lattice points ``origin + (m + 1/2) spacing`` inside ``mesh``.

    ``jitter`` moves each particle uniformly by up to +-jitter/2 spacing per axis (seeded by ``rng``).
    """
    lo, hi = mesh.bounds
    axes = [lattice_axis(lo[d], hi[d], origin[d], spacing) for d in range(3)]
    mask = inside_lattice(mesh, *axes)
    ii, jj, kk = np.nonzero(mask)
    points = np.stack([axes[0][ii], axes[1][jj], axes[2][kk]], axis=1)
    if jitter > 0 and len(points):
        points = points + rng.uniform(-0.5, 0.5, size=points.shape) * jitter * spacing
    return points
