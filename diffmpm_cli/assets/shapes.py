"""Scene shapes -> watertight trimesh meshes placed in world coordinates [m].

Primitives are tessellated at fixed, fine resolutions; mesh files are read, repaired where trimesh can, and
recentred on their bounding-box centre; unions, differences and intersections go through manifold3d.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import trimesh

from ..config.schema import MESH_SUFFIXES
from ..errors import AssetError

# fixed tessellation of the primitives (faces: sphere 5120, cylinder/capsule 64 around, torus 64 x 32)
SPHERE_SUBDIVISIONS = 4
SECTIONS = 64
_AXIS_FROM_Z = {  # rotation taking a primitive built along +z to the requested axis
    "z": np.eye(4),
    "y": trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0]),
    "x": trimesh.transformations.rotation_matrix(math.pi / 2, [0, 1, 0]),
}
_BOOLEANS = {"union": trimesh.boolean.union, "difference": trimesh.boolean.difference,
             "intersection": trimesh.boolean.intersection}


def build_mesh(shape, *, key: str, default_center) -> trimesh.Trimesh:
    """The watertight mesh of a scene shape in world coordinates.

    ``key`` is the shape's key path (for messages); ``default_center`` is used when ``shape.center`` is null.
    Raises AssetError naming the key path of the part that failed.
    """
    if shape.shape == "mesh":
        mesh = _mesh_file(shape, key)
    elif shape.shape in _BOOLEANS:
        parts = [build_mesh(part, key=f"{key}.parts[{i}]", default_center=(0.0, 0.0, 0.0))
                 for i, part in enumerate(shape.parts)]
        mesh = _boolean(shape.shape, parts, key)
    else:
        mesh = _primitive(shape, key)
    center = shape.center if shape.center is not None else default_center
    rx, ry, rz = (math.radians(a) for a in shape.rotation)
    transform = trimesh.transformations.euler_matrix(rx, ry, rz, axes="sxyz")
    transform[:3, :3] *= shape.scale
    transform[:3, 3] = center
    mesh.apply_transform(transform)
    if not np.all(np.isfinite(mesh.vertices)):
        raise AssetError(key, "sizes or positions overflow to non-finite coordinates")
    return mesh


def _primitive(shape, key: str) -> trimesh.Trimesh:
    kind = shape.shape
    if kind == "sphere":
        return trimesh.creation.icosphere(subdivisions=SPHERE_SUBDIVISIONS, radius=shape.radius)
    if kind == "box":
        return trimesh.creation.box(extents=shape.size)
    if kind == "torus":
        if shape.minor_radius >= shape.major_radius:
            raise AssetError(f"{key}.minor_radius",
                             f"must be < major_radius ({shape.major_radius:g}), got {shape.minor_radius:g}")
        mesh = trimesh.creation.torus(shape.major_radius, shape.minor_radius, major_sections=SECTIONS,
                                      minor_sections=SECTIONS // 2)
    elif kind == "capsule":
        mesh = trimesh.creation.capsule(height=shape.height, radius=shape.radius, count=[SECTIONS, SECTIONS // 2])
    elif kind == "cylinder":
        mesh = trimesh.creation.cylinder(radius=shape.radius, height=shape.height, sections=SECTIONS)
    else:  # the schema's Literal tags make this unreachable; keep the failure loud if a new shape is added
        raise AssetError(key, f"unsupported shape '{kind}'")
    mesh.apply_transform(_AXIS_FROM_Z[shape.axis])
    return mesh


def _boolean(op: str, parts: list[trimesh.Trimesh], key: str) -> trimesh.Trimesh:
    for i, part in enumerate(parts):
        if not part.is_volume:
            raise AssetError(f"{key}.parts[{i}]", "is not a closed volume (degenerate or extreme sizes?)")
    if len(parts) == 1:
        mesh = parts[0]
    else:
        try:
            mesh = _BOOLEANS[op](parts, engine="manifold")
        except ValueError as exc:
            raise AssetError(key, f"the {op} of its parts failed: {exc}") from exc
    if len(mesh.faces) == 0 or mesh.volume <= 0:
        raise AssetError(key, f"the {op} of its parts is empty")
    return mesh


def _mesh_file(shape, key: str) -> trimesh.Trimesh:
    path = Path(shape.path)
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise AssetError(f"{key}.path", f"cannot open mesh file '{path}': {exc.strerror}") from exc
    mesh = _read_mesh(str(path), stat.st_mtime_ns, stat.st_size, key).copy()
    lo, hi = mesh.bounds
    mesh.apply_translation(-(lo + hi) / 2.0)
    if shape.size is not None:
        mesh.apply_scale(shape.size / float(np.max(hi - lo)))
    return mesh


@functools.lru_cache(maxsize=16)
def _read_mesh(path: str, mtime_ns: int, size: int, key: str) -> trimesh.Trimesh:
    """Read, check and repair a mesh file (cached on path, modification time and size)."""
    suffix = Path(path).suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise AssetError(f"{key}.path", f"unsupported mesh format '{suffix}' (use one of {', '.join(MESH_SUFFIXES)})")
    try:
        mesh = trimesh.load(path, force="mesh", process=True)
    except Exception as exc:  # trimesh's loaders raise many types on a malformed file; name the file and the cause
        raise AssetError(f"{key}.path", f"cannot read '{path}' as a {suffix} mesh: {exc}") from exc
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise AssetError(f"{key}.path", f"'{path}' holds no triangles")
    if not np.all(np.isfinite(mesh.vertices)):
        raise AssetError(f"{key}.path", f"'{path}' has non-finite vertex coordinates")
    if not mesh.is_watertight:
        mesh.merge_vertices()
        mesh.update_faces(mesh.nondegenerate_faces())
        trimesh.repair.fill_holes(mesh)
    if not mesh.is_watertight:
        open_edges = len(trimesh.grouping.group_rows(mesh.edges_sorted, require_count=1))
        raise AssetError(
            f"{key}.path",
            f"'{path}' is not watertight ({open_edges} open edges) and trimesh could not repair it; close the mesh",
        )
    trimesh.repair.fix_normals(mesh)
    if mesh.volume <= 0:
        raise AssetError(f"{key}.path", f"'{path}' encloses no volume")
    return mesh
