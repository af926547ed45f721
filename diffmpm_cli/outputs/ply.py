"""PLY files: Gaussian splats in the standard 3D Gaussian Splatting vertex layout, and plain particle point clouds.

Gaussians are written as one ``vertex`` element of float32 properties, in the order used by the Inria 3DGS code and the
viewers that read its output::

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 [f_rest_0 .. f_rest_{3K-1}] opacity scale_0 scale_1 scale_2 rot_0 .. rot_3

* ``f_dc`` are degree-0 spherical-harmonic coefficients, ``rgb = C0 * f_dc + 0.5``;
* ``f_rest`` (only when view-dependent colours are written) are the K = 3, 8 or 15 coefficients of SH degrees
  1..3 per colour channel, channel-major as the 3DGS trainer's ``save_ply`` writes them:
  ``f_rest_{c K + k}`` is channel c, coefficient k (3DGS's ``eval_sh`` order and signs);
* ``opacity`` is stored as a logit, ``alpha = sigmoid(opacity)``;
* ``scale_i`` are log standard deviations (log m) along the principal axes;
* ``rot`` is a unit quaternion ``(w, x, y, z)`` of the rotation R whose columns are those axes, so that
  ``covariance = R diag(exp(scale)^2) R^T`` (m^2).

All files are binary little-endian and are written atomically (temporary file in the same folder, then ``os.replace``).

Exported splats can be turned to another up axis (``output.up_axis``, ``UP_ROTATIONS``): the simulation's world is
y-up (gravity along -y); ``z`` turns it so +y becomes +z (Blender, z-up, shows the object standing), ``-y`` so +y
becomes -y (the COLMAP/OpenCV convention of trained 3DGS scenes, which SuperSplat and the INRIA viewer show upright).
The rotation turns the positions and covariances here (``to_up_axis``) and the SH coefficients of degrees 1..3 in
``optimize/outputs.py`` (``write_splats``), which also turns them with each Gaussian's local rotation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .files import atomic_write

C0 = 0.28209479177387814  # degree-0 real spherical harmonic, 1 / (2 sqrt(pi))
MIN_OPACITY = 1e-6  # opacities are clamped to [MIN_OPACITY, 1 - MIN_OPACITY] before the logit
SH_REST_DEGREE = {0: 0, 3: 1, 8: 2, 15: 3}  # degree 1..3 coefficients per channel -> SH degree
MIN_VARIANCE = 1e-30  # m^2; eigenvalues below this (flat or degenerate Gaussians) are raised to it before the log

GAUSSIAN_PROPERTIES = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)

# PLY scalar type names (both spellings) -> numpy type codes without byte order
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


UP_ROTATIONS = {  # output.up_axis -> the proper rotation R applied to exported positions (R x) and covariances
    "y": np.eye(3),
    "z": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),  # +90 deg about x: +y -> +z, +z -> -y
    "-y": np.diag([1.0, -1.0, -1.0]),  # 180 deg about x: +y -> -y, +z -> -z
}


def to_up_axis(up_axis: str, *, means, covars) -> tuple[np.ndarray, np.ndarray]:
    """Means [M, 3] and covariances [M, 3, 3] (float64) turned from the simulation's y-up world to ``up_axis``."""
    R = UP_ROTATIONS[up_axis]
    means, covars = _numpy(means, "means"), _numpy(covars, "covars")
    return means @ R.T, R @ covars @ R.T


def _numpy(x, name: str, *, finite: bool = True) -> np.ndarray:
    """A float64 numpy copy of a torch tensor or array-like; with ``finite``, NaN or inf values raise ValueError."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if finite and not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite values")
    return x


def _write_vertex_ply(path, columns: Mapping[str, np.ndarray], comment: str) -> Path:
    """Write a binary little-endian PLY with one ``vertex`` element of float32 ``columns`` (each [N])."""
    names = list(columns)
    count = len(next(iter(columns.values()))) if columns else 0
    table = np.empty(count, dtype=[(n, "<f4") for n in names])
    for n in names:
        table[n] = columns[n]
    header = ["ply", "format binary_little_endian 1.0", f"comment {comment}", f"element vertex {count}"]
    header += [f"property float {n}" for n in names]
    header.append("end_header")
    data = ("\n".join(header) + "\n").encode("ascii") + table.tobytes()
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _rotation_to_quaternion(R: np.ndarray) -> np.ndarray:
    """Unit quaternions (w, x, y, z), w >= 0, [M,4] of rotation matrices [M,3,3] (numerically stable branch choice)."""
    r = R
    trace = r[:, 0, 0] + r[:, 1, 1] + r[:, 2, 2]
    # 4 * (w^2, x^2, y^2, z^2): divide by the largest of them to stay well conditioned
    d = np.stack([1 + trace, 1 + r[:, 0, 0] - r[:, 1, 1] - r[:, 2, 2],
                  1 - r[:, 0, 0] + r[:, 1, 1] - r[:, 2, 2], 1 - r[:, 0, 0] - r[:, 1, 1] + r[:, 2, 2]], axis=1)
    big = np.argmax(d, axis=1)
    s = 2.0 * np.sqrt(np.maximum(d[np.arange(len(r)), big], 1e-300))  # = 4 * |largest component|
    a21, a12, a02, a20, a10, a01 = r[:, 2, 1], r[:, 1, 2], r[:, 0, 2], r[:, 2, 0], r[:, 1, 0], r[:, 0, 1]
    candidates = np.stack([
        np.stack([s / 4, (a21 - a12) / s, (a02 - a20) / s, (a10 - a01) / s], axis=1),
        np.stack([(a21 - a12) / s, s / 4, (a01 + a10) / s, (a02 + a20) / s], axis=1),
        np.stack([(a02 - a20) / s, (a01 + a10) / s, s / 4, (a12 + a21) / s], axis=1),
        np.stack([(a10 - a01) / s, (a02 + a20) / s, (a12 + a21) / s, s / 4], axis=1),
    ], axis=1)
    q = candidates[np.arange(len(r)), big]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return np.where(q[:, :1] < 0, -q, q)


def _quaternion_to_rotation(q: np.ndarray) -> np.ndarray:
    """Rotation matrices [M,3,3] of quaternions (w, x, y, z) [M,4]; the quaternions are normalised first."""
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], axis=1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], axis=1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=1),
    ], axis=1)


def covariance_to_scale_rotation(covars) -> tuple[np.ndarray, np.ndarray]:
    """Log standard deviations [M,3] (log m) and quaternions (w, x, y, z) [M,4] with Σ = R diag(exp(2 scale)) Rᵀ."""
    cov = _numpy(covars, "covars")
    cov = 0.5 * (cov + np.swapaxes(cov, 1, 2))
    eigenvalues, R = np.linalg.eigh(cov)
    flip = np.linalg.det(R) < 0
    R[flip, :, 2] *= -1  # a proper rotation: the eigenvector basis stays valid with one axis reversed
    scales = 0.5 * np.log(np.maximum(eigenvalues, MIN_VARIANCE))
    return scales, _rotation_to_quaternion(R)


def scale_rotation_to_covariance(scales, quats) -> np.ndarray:
    """Covariances [M,3,3] (float64, m^2) from log standard deviations [M,3] and quaternions (w, x, y, z) [M,4]."""
    R = _quaternion_to_rotation(np.asarray(quats, dtype=np.float64))
    variances = np.exp(2.0 * np.asarray(scales, dtype=np.float64))
    return (R * variances[:, None, :]) @ np.swapaxes(R, 1, 2)


def write_gaussians_ply(path, *, means, covars, colors, opacities, sh_rest=None) -> Path:
    """Write Gaussians to a 3DGS-layout PLY.

    means [M,3] (m), covars [M,3,3] symmetric PSD (m^2), colors [M,3] RGB in [0,1], opacities [M] in (0,1);
    sh_rest [M,K,3] (K = 3, 8 or 15: SH degrees 1..3, channels last, in the file's frame) or None (degree 0 only);
    torch tensors or numpy arrays. Returns ``path``.
    """
    means, colors, opacities = _numpy(means, "means"), _numpy(colors, "colors"), _numpy(opacities, "opacities")
    count = len(means)
    covars = _numpy(covars, "covars")
    expected = {"means": (means, (count, 3)), "covars": (covars, (count, 3, 3)), "colors": (colors, (count, 3)),
                "opacities": (opacities, (count,))}
    for name, (array, shape) in expected.items():
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    rest = np.zeros((count, 0, 3)) if sh_rest is None else _numpy(sh_rest, "sh_rest")
    if rest.ndim != 3 or rest.shape[0] != count or rest.shape[1] not in SH_REST_DEGREE or rest.shape[2] != 3:
        raise ValueError(f"sh_rest has shape {rest.shape}, expected ({count}, K, 3) with K in 0, 3, 8, 15")
    scales, quats = covariance_to_scale_rotation(covars)
    alpha = np.clip(opacities, MIN_OPACITY, 1 - MIN_OPACITY)
    f_dc = (colors - 0.5) / C0
    values = [*means.T, *np.zeros((3, count)), *f_dc.T, np.log(alpha) - np.log1p(-alpha), *scales.T, *quats.T]
    columns = dict(zip(GAUSSIAN_PROPERTIES, values))
    if rest.shape[1]:  # f_rest_* between f_dc_2 and opacity, channel-major
        names = list(columns)
        at = names.index("opacity")
        flat = rest.transpose(0, 2, 1).reshape(count, -1)
        extra = {f"f_rest_{i}": flat[:, i] for i in range(flat.shape[1])}
        columns = {**{n: columns[n] for n in names[:at]}, **extra, **{n: columns[n] for n in names[at:]}}
    return _write_vertex_ply(path, columns, "3D Gaussian splats written by diffmpm")


def read_vertex_ply(path) -> dict[str, np.ndarray]:
    """All scalar properties of a binary PLY's ``vertex`` element, by name, as numpy arrays [N] (header order).

    Elements before ``vertex`` are skipped (they must have scalar properties only); elements after it are ignored.
    """
    raw = Path(path).read_bytes()
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    body = raw.index(b"\n", end) + 1
    lines = raw[:body].decode("ascii", errors="replace").splitlines()
    order = None
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []  # (name, count, [(property, type code)])
    for line in lines[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info", "end_header"):
            continue
        if words[0] == "format":
            order = {"binary_little_endian": "<", "binary_big_endian": ">"}.get(words[1])
            if order is None:
                raise ValueError(f"{path}: PLY format {words[1]!r} is not supported (binary only)")
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if words[1] == "list":
                elements[-1][2].append((words[-1], "list"))
            elif words[1] in _PLY_TYPES:
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
            else:
                raise ValueError(f"{path}: unknown PLY property type {words[1]!r}")
    if order is None:
        raise ValueError(f"{path}: PLY header has no format line")
    offset = body
    for name, count, properties in elements:
        if any(code == "list" for _, code in properties):
            if name == "vertex":
                raise ValueError(f"{path}: list properties in the vertex element are not supported")
            raise ValueError(f"{path}: element {name!r} with list properties comes before 'vertex'")
        dtype = np.dtype([(p, order + code) for p, code in properties])
        if name == "vertex":
            table = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
            return {p: table[p].astype(table[p].dtype.newbyteorder("=")) for p, _ in properties}
        offset += dtype.itemsize * count
    raise ValueError(f"{path}: PLY file has no vertex element")


def read_gaussians_ply(path) -> dict[str, np.ndarray]:
    """Read a 3DGS-layout PLY (ours or another tool's; extra properties such as ``f_rest_*`` are ignored).

    Returns float32 numpy arrays: ``means`` [M,3] (m), ``covars`` [M,3,3] (m^2), ``colors`` [M,3] (RGB from the
    degree-0 coefficients, not clipped), ``opacities`` [M] in (0,1).
    """
    columns = read_vertex_ply(path)
    missing = [p for p in GAUSSIAN_PROPERTIES if p not in columns and p not in ("nx", "ny", "nz")]
    if missing:
        raise ValueError(f"{path}: PLY vertex element lacks Gaussian properties {missing}")

    def stack(names):
        return np.stack([columns[n].astype(np.float64) for n in names], axis=1)

    covars = scale_rotation_to_covariance(stack(["scale_0", "scale_1", "scale_2"]),
                                          stack(["rot_0", "rot_1", "rot_2", "rot_3"]))
    logit = columns["opacity"].astype(np.float64)
    return {
        "means": stack(["x", "y", "z"]).astype(np.float32),
        "covars": covars.astype(np.float32),
        "colors": (C0 * stack(["f_dc_0", "f_dc_1", "f_dc_2"]) + 0.5).astype(np.float32),
        "opacities": (0.5 * (1.0 + np.tanh(0.5 * logit))).astype(np.float32),  # sigmoid without overflow
    }


def write_particles_ply(path, *, positions, extra: Mapping[str, object] | None = None) -> Path:
    """Write particles as a point-cloud PLY: positions [N,3] (m) and optional float32 scalars ``extra`` {name: [N]}.

    Example: ``extra={"J": detF}`` stores each particle's volume ratio. Non-finite values are written as they are
    (useful to inspect a simulation that blew up). Returns ``path``.
    """
    positions = _numpy(positions, "positions", finite=False)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions has shape {positions.shape}, expected [N, 3]")
    columns = {"x": positions[:, 0], "y": positions[:, 1], "z": positions[:, 2]}
    for name, values in (extra or {}).items():
        if name in columns or not name.isidentifier():
            raise ValueError(f"bad extra property name {name!r}")
        values = _numpy(values, name, finite=False).reshape(-1)
        if len(values) != len(positions):
            raise ValueError(f"extra property {name!r} has {len(values)} values for {len(positions)} particles")
        columns[name] = values
    return _write_vertex_ply(path, columns, "particles written by diffmpm")
