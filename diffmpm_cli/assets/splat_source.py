"""A trained 3D Gaussian Splatting scene as the simulated body (``source: {shape: gaussians, path: scene.ply}``).

The PLY is read in the INRIA layout with ``plyfile`` (x y z, f_dc_0..2, f_rest_* for SH degrees 1..3, opacity
logits, log scales, w x y z quaternions). The object is selected (a box or sphere crop in the PLY's coordinates, an
opacity threshold), placed in the scene (``world_from_capture``, the same similarity a capture rig takes), and
filled with particles: lattice points within ``occupancy_sigmas`` standard deviations of a kept Gaussian are the
shell the trained Gaussians cover; the lattice points the shell encloses are filled in too (scipy's
``binary_fill_holes``: the interior a surface-only 3DGS scene leaves empty), and how many were filled is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import AssetError

MAX_SPLATS = 20_000_000
REST_COUNT = {0: 0, 9: 1, 24: 2, 45: 3}  # f_rest_* properties -> SH degree


@dataclass
class SplatCloud:
    """Trained Gaussians in scene coordinates: means [M, 3] m, covars [M, 3, 3] m^2, colors [M, 3] (degree-0 RGB,
    C0 f_dc + 0.5), sh_rest [M, K, 3] (degrees 1..3 coefficients, K = 0, 3, 8 or 15), opacities [M] in (0, 1),
    ``frame`` [3, 3]: the rotation that placed them (view directions turn back by its transpose before the SH are
    evaluated). ``read``/``kept``: Gaussians in the file and after the selection."""

    means: np.ndarray
    covars: np.ndarray
    colors: np.ndarray
    sh_rest: np.ndarray
    opacities: np.ndarray
    frame: np.ndarray
    read: int = 0
    kept: int = 0

    @property
    def degree(self) -> int:
        return {0: 0, 3: 1, 8: 2, 15: 3}[self.sh_rest.shape[1]]

    def normals(self) -> np.ndarray:
        """The axis of each Gaussian's smallest extent [M, 3] (unit): its normal for surface metrics."""
        _, vectors = np.linalg.eigh(self.covars)
        return vectors[:, :, 0]


def quaternion_rotations(q: np.ndarray) -> np.ndarray:
    """Rotation matrices [M, 3, 3] of quaternions (w, x, y, z) [M, 4], normalised first (as 3DGS does)."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], axis=1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], axis=1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=1)], axis=1)


def read_splat_ply(path: str, *, key: str) -> SplatCloud:
    """The Gaussians of a 3DGS PLY (INRIA layout) in its own coordinates; AssetError naming ``key`` otherwise."""
    from plyfile import PlyData

    try:
        ply = PlyData.read(path)
        vertex = ply["vertex"]
    except Exception as exc:  # noqa: BLE001 - plyfile raises many types on malformed files
        raise AssetError(key, f"not a readable PLY with a vertex element: {path} ({type(exc).__name__}: {exc})") \
            from None
    names = set(vertex.data.dtype.names or ())
    needed = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
              "rot_0", "rot_1", "rot_2", "rot_3"]
    missing = [n for n in needed if n not in names]
    if missing:
        if {"x", "y", "z"} <= names and "scale_0" not in names:
            raise AssetError(key, f"{path} is a point cloud or mesh, not trained Gaussians (no {', '.join(missing[:4])}"
                                  ", ...): give a 3DGS PLY (INRIA layout), or use shape: mesh")
        raise AssetError(key, f"{path} lacks the 3DGS properties {', '.join(missing)}")
    rest_names = sorted((n for n in names if n.startswith("f_rest_")), key=lambda n: int(n[7:]))
    if len(rest_names) not in REST_COUNT or [int(n[7:]) for n in rest_names] != list(range(len(rest_names))):
        raise AssetError(key, f"{path} has {len(rest_names)} f_rest_* properties; 3DGS writes 0, 9, 24 or 45 "
                              "(SH degree 0..3)")
    count = len(vertex.data)
    if count == 0:
        raise AssetError(key, f"{path} holds no Gaussian")
    if count > MAX_SPLATS:
        raise AssetError(key, f"{path} holds {count:,} Gaussians, more than the limit of {MAX_SPLATS:,}")

    def column(*cols):
        return np.stack([np.asarray(vertex[c], dtype=np.float64) for c in cols], axis=1)

    means, dc = column("x", "y", "z"), column("f_dc_0", "f_dc_1", "f_dc_2")
    logit, log_scales = np.asarray(vertex["opacity"], np.float64), column("scale_0", "scale_1", "scale_2")
    quats = column("rot_0", "rot_1", "rot_2", "rot_3")
    K = len(rest_names) // 3
    rest = column(*rest_names).reshape(count, 3, K).transpose(0, 2, 1) if K else np.zeros((count, 0, 3))
    arrays = [means, dc, logit, log_scales, quats, rest]
    if not all(np.all(np.isfinite(a)) for a in arrays) or np.any(np.linalg.norm(quats, axis=1) == 0):
        raise AssetError(key, f"{path} holds non-finite values or zero quaternions")
    R = quaternion_rotations(quats)
    variances = np.exp(2.0 * np.clip(log_scales, -30.0, 10.0))
    covars = (R * variances[:, None, :]) @ np.swapaxes(R, 1, 2)
    opacities = 0.5 * (1.0 + np.tanh(0.5 * logit))  # the logistic function without overflow
    return SplatCloud(means=means, covars=covars, colors=0.28209479177387814 * dc + 0.5, sh_rest=rest,
                      opacities=opacities, frame=np.eye(3), read=count, kept=count)


def select_splats(cloud: SplatCloud, *, crop_box=None, crop_sphere=None, min_opacity: float, key: str) -> SplatCloud:
    """The Gaussians inside the crop (box [lower, upper] or sphere (centre, radius), in the PLY's coordinates) with
    opacity >= ``min_opacity``; AssetError naming ``key`` when none is left."""
    keep = cloud.opacities >= min_opacity
    if crop_box is not None:
        lower, upper = np.asarray(crop_box[0], np.float64), np.asarray(crop_box[1], np.float64)
        keep &= np.all((cloud.means >= lower) & (cloud.means <= upper), axis=1)
    if crop_sphere is not None:
        centre, radius = np.asarray(crop_sphere[0], np.float64), float(crop_sphere[1])
        keep &= np.linalg.norm(cloud.means - centre, axis=1) <= radius
    if not np.any(keep):
        raise AssetError(key, f"no Gaussian of the {cloud.read:,} is left after the crop and min_opacity "
                              f"({min_opacity:g}): widen the crop or lower min_opacity")
    return SplatCloud(means=cloud.means[keep], covars=cloud.covars[keep], colors=cloud.colors[keep],
                      sh_rest=cloud.sh_rest[keep], opacities=cloud.opacities[keep], frame=cloud.frame,
                      read=cloud.read, kept=int(keep.sum()))


def place_splats(cloud: SplatCloud, *, scale: float, rotation: np.ndarray, shift: np.ndarray) -> SplatCloud:
    """The Gaussians moved by x -> scale R x + shift: means, covariances (scale^2 R Sigma R^T) and the SH frame."""
    R = np.asarray(rotation, np.float64)
    return SplatCloud(means=scale * cloud.means @ R.T + shift, covars=scale**2 * (R @ cloud.covars @ R.T),
                      colors=cloud.colors, sh_rest=cloud.sh_rest, opacities=cloud.opacities, frame=R @ cloud.frame,
                      read=cloud.read, kept=cloud.kept)


def splat_particles(cloud: SplatCloud, *, origin, spacing: float, sigmas: float, fill: bool, key: str,
                    max_points: int) -> tuple[np.ndarray, int, int]:
    """(lattice points [N, 3] m, shell count, filled count): lattice points (``origin`` + spacing x integer) within
    ``sigmas`` standard deviations (Mahalanobis) of a Gaussian widened by half a spacing, plus, with ``fill``, those
    the shell encloses."""
    from scipy.ndimage import binary_fill_holes
    from scipy.spatial import cKDTree

    origin = np.asarray(origin, np.float64)
    # each Gaussian widened by half the lattice spacing, so that flat surface Gaussians (thinner than the lattice
    # spacing, as trained surfaces are) still mark the lattice points beside them and the shell has no gaps
    covars = cloud.covars + (0.5 * spacing) ** 2 * np.eye(3)
    radii = sigmas * np.sqrt(np.linalg.eigvalsh(covars)[:, -1])  # the longest axis of each ellipsoid
    lo = np.floor((np.min(cloud.means - radii[:, None], axis=0) - origin) / spacing).astype(np.int64) - 1
    hi = np.ceil((np.max(cloud.means + radii[:, None], axis=0) - origin) / spacing).astype(np.int64) + 1
    shape = hi - lo + 1
    if int(np.prod(shape)) > max_points:
        raise AssetError(key, f"the selected Gaussians span a lattice of {int(np.prod(shape)):,} points (at spacing "
                              f"{spacing:.4g} m), more than {max_points:,}: crop tighter or lower the resolution")
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).reshape(-1, 3)
    points = origin + (idx + lo) * spacing
    occupied = np.zeros(len(points), dtype=bool)
    tree = cKDTree(points)
    precisions = np.linalg.inv(covars)
    for start in range(0, len(cloud.means), 4096):
        block = slice(start, start + 4096)
        for j, near in enumerate(tree.query_ball_point(cloud.means[block], radii[block])):
            if near:
                d = points[near] - cloud.means[start + j]
                inside = np.einsum("pi,ij,pj->p", d, precisions[start + j], d) <= sigmas * sigmas
                occupied[np.asarray(near)[inside]] = True
    grid = occupied.reshape(tuple(shape))
    shell = int(grid.sum())
    if fill:
        grid = binary_fill_holes(grid)
    filled = int(grid.sum()) - shell
    return points[grid.reshape(-1)], shell, filled
