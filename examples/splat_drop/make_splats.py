"""Write cow_splats.ply: a 3DGS-style object in the INRIA layout, made from Spot the cow's surface (not trained).

Blue-noise samples of scenes/meshes/spot.obj (public domain, scenes/meshes/README.md) become flat Gaussians tangent
to the surface (about as wide as the samples' spacing, 0.15 of that thick), coloured white with dark patches (a
procedural pattern) plus a small degree-1 view-dependent term. The file is written the way trained scenes come:
in a COLMAP-like frame (y down, z away: the scene's coordinates turned 180 degrees about x) and twice the scene's
scale, so the scene undoes both with source.world_from_capture. Deterministic: python make_splats.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh
from plyfile import PlyData, PlyElement

HERE = Path(__file__).resolve().parent
MESH = HERE.parents[1] / "scenes" / "meshes" / "spot.obj"
COUNT = 2500
SIZE = 0.3  # m, the longest side in the scene
CENTER = np.array([0.5, 0.42, 0.5])  # in the scene
CAPTURE_SCALE = 2.0  # capture units per scene metre
C0 = 0.28209479177387814


def tangent_quaternions(normals: np.ndarray, spins: np.ndarray) -> np.ndarray:
    """(w, x, y, z) of rotations taking +z to each normal after a spin about z."""
    out = []
    for n, spin in zip(normals, spins):
        axis = np.cross([0.0, 0.0, 1.0], n)
        s = np.linalg.norm(axis)
        half = 0.5 * np.arctan2(s, n[2])
        a = axis / s if s > 1e-12 else np.array([1.0, 0.0, 0.0])
        w1, x1, y1, z1 = np.cos(half), *(np.sin(half) * a)
        w2, z2 = np.cos(spin / 2), np.sin(spin / 2)
        out.append([w1 * w2 - z1 * z2, x1 * w2 + y1 * z2, y1 * w2 - x1 * z2, w1 * z2 + z1 * w2])
    return np.array(out)


def main() -> None:
    rng = np.random.default_rng(15)
    mesh = trimesh.load(MESH, force="mesh")
    mesh.merge_vertices()
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    mesh.apply_scale(SIZE / mesh.extents.max())
    points, faces = trimesh.sample.sample_surface_even(mesh, COUNT, seed=15)
    normals = mesh.face_normals[faces]
    count = len(points)
    disc = 1.2 * np.sqrt(mesh.area / count)
    patches = np.sin(31 * points[:, 0]) * np.sin(27 * points[:, 1] + 1) * np.sin(23 * points[:, 2] + 2) > 0.25
    rgb = np.where(patches[:, None], [0.12, 0.1, 0.1], [0.92, 0.9, 0.86]) + 0.03 * rng.normal(size=(count, 3))
    scene_points = points + CENTER
    # the capture frame: 180 degrees about x (y down, z away), CAPTURE_SCALE units per metre
    flip = np.diag([1.0, -1.0, -1.0])
    capture_points = CAPTURE_SCALE * scene_points @ flip.T
    capture_normals = normals @ flip.T
    quats = tangent_quaternions(capture_normals, rng.uniform(0, 2 * np.pi, count))
    scales = np.log(CAPTURE_SCALE * np.stack([disc * rng.uniform(0.9, 1.1, count), disc * rng.uniform(0.9, 1.1, count),
                                              np.full(count, 0.15 * disc)], axis=1))
    f_rest = 0.05 * rng.normal(size=(count, 3, 3))  # degree 1: [N, K = 3, RGB]
    names = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(9)]
             + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    columns = np.concatenate([capture_points, np.zeros((count, 3)), (rgb - 0.5) / C0,
                              f_rest.transpose(0, 2, 1).reshape(count, 9), np.full((count, 1), 3.0), scales, quats],
                             axis=1)
    table = np.empty(count, dtype=[(n, "f4") for n in names])
    for i, n in enumerate(names):
        table[n] = columns[:, i]
    PlyData([PlyElement.describe(table, "vertex")]).write(str(HERE / "cow_splats.ply"))
    print(f"wrote {HERE / 'cow_splats.ply'}: {count} Gaussians, SH degree 1")


if __name__ == "__main__":
    main()
