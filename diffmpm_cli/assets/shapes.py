"""Scene shapes -> trimesh meshes placed in world coordinates [m].

Primitives are tessellated at fixed, fine resolutions; mesh files are read, repaired (``repair_mesh``) and
recentred on their bounding-box centre; unions, differences and intersections go through manifold3d. Every
shape is a closed volume except a mesh file that could not be closed (holes, parts touching along an edge):
it comes back open with ``metadata["inside_test"] == "winding"`` and is refused as a part of a boolean.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from stat import S_ISREG

import numpy as np
import trimesh

from ..config.schema import MESH_SUFFIXES
from ..errors import AssetError
from .lattice import WINDING_INSIDE, winding_numbers

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
    """The mesh of a scene shape in world coordinates (closed, except a mesh file ``repair_mesh`` could not close).

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
        mesh = trimesh.creation.icosphere(subdivisions=SPHERE_SUBDIVISIONS, radius=shape.radius)
    elif kind == "box":
        mesh = trimesh.creation.box(extents=shape.size)
    elif kind == "torus":
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
    # trimesh merges vertices closer than ~1e-8 m (a capsule of radius 1e-6 collapses); extreme sizes under- or
    # overflow in the tessellation's arithmetic (a sphere of radius 1e-200 or 1e200)
    if len(mesh.faces) == 0 or not np.all(np.isfinite(mesh.vertices)) or not mesh.is_volume:
        raise AssetError(key, "cannot be tessellated at this size: its triangles collapse or its coordinates under- "
                              "or overflow (sizes of 1e-4..1e6 m are safe)")
    if hasattr(shape, "axis"):
        mesh.apply_transform(_AXIS_FROM_Z[shape.axis])
    return mesh


def _boolean(op: str, parts: list[trimesh.Trimesh], key: str) -> trimesh.Trimesh:
    for i, part in enumerate(parts):
        if part.metadata.get("defects"):
            raise AssetError(f"{key}.parts[{i}]", f"is a mesh that is not closed ({part.metadata['defects']}); "
                                                  f"a {op} needs closed volumes: close the mesh file, or use it as a "
                                                  "shape of its own (particles then come from its winding number)")
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
    except (OSError, ValueError) as exc:  # ValueError: a NUL character in the name
        raise AssetError(f"{key}.path", f"cannot open mesh file '{path}': {getattr(exc, 'strerror', None) or exc}") from None
    if not S_ISREG(stat.st_mode):
        raise AssetError(f"{key}.path", f"'{path}' is not a regular file")
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
    return repair_mesh(mesh, key=f"{key}.path", name=f"'{path}'")


def repair_mesh(mesh: trimesh.Trimesh, *, key: str, name: str) -> trimesh.Trimesh:
    """A mesh particles can be placed in: closed and outward-oriented where it can be repaired, else open.

    Repairs, in order: vertices merged by position alone (texture seams and split normals leave duplicates that
    ``process`` keeps apart), degenerate and duplicate faces dropped, faces dangling from non-manifold edges
    (fins) dropped, holes of 3 or 4 edges filled, normals made consistent and outward. Other non-manifold
    edges (two parts touching along an edge) and larger holes are left as they are: cutting or capping them
    would change the shape, and the winding number copes with them.

    When the result is a closed volume, ``metadata["inside_test"]`` is ``"parity"``. Otherwise the mesh is
    returned unclosed (small holes filled, faces oriented by the winding number), ``metadata["inside_test"]`` is
    ``"winding"`` and ``metadata["defects"]`` says what stayed open: particles then come from the generalised
    winding number (``lattice.inside_lattice_winding``); ``mesh.area``, bounds and surface sampling are exact,
    ``mesh.volume`` only approximate (each hole counts as capped by a cone to the origin). ``metadata["repairs"]``
    lists what was changed. Raises AssetError(``key``) when no point lies inside (an open sheet) or nothing but
    degenerate triangles is left. ``name`` names the mesh in messages.
    """
    repairs: list[str] = []
    base = trimesh.Trimesh(vertices=np.asarray(mesh.vertices, dtype=np.float64), faces=np.asarray(mesh.faces),
                           process=False)  # geometry only: UVs and normals must not keep seam vertices apart
    vertex_count = len(base.vertices)
    base.merge_vertices()
    if len(base.vertices) < vertex_count:
        repairs.append(f"merged {vertex_count - len(base.vertices)} vertices sharing a position (seams)")
    keep = base.nondegenerate_faces() & base.unique_faces()
    if not keep.all():
        repairs.append(f"dropped {int((~keep).sum())} degenerate or duplicate faces")
        base.update_faces(keep)
        base.remove_unreferenced_vertices()
    if len(base.faces) == 0:
        raise AssetError(key, f"{name} holds only degenerate triangles")
    fins = _drop_fins(base)
    if fins:
        repairs.append(f"dropped {fins} faces dangling from non-manifold edges")

    closed, closing = _close(base.copy())
    if closed.is_volume:
        closed.metadata.update(inside_test="parity", repairs=repairs + closing, defects="")
        return closed

    # not closable: keep every other face (the winding number uses them all), fill what is trivially fillable
    face_count = len(base.faces)
    trimesh.repair.fill_holes(base)
    if len(base.faces) > face_count:
        repairs.append(f"filled holes with {len(base.faces) - face_count} faces")
    trimesh.repair.fix_winding(base)
    defects = _defects(base)
    lo, hi = base.bounds
    pad = 0.01 * float(np.max(hi - lo))
    count = np.maximum(3, np.ceil(_SAMPLES * (hi - lo) / np.max(hi - lo))).astype(int)
    axes = [np.linspace(lo[d] - pad, hi[d] + pad, count[d]) for d in range(3)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    winding = winding_numbers(base, points, key=key)
    if np.sum(winding < -WINDING_INSIDE) > np.sum(winding > WINDING_INSIDE):
        base.invert()  # consistently oriented inwards
        winding = -winding
        repairs.append("faces turned outwards")
    if not np.any(winding > WINDING_INSIDE):
        raise AssetError(key, f"{name} encloses no volume: it is not closed ({defects}) and none of {len(points)} "
                              "points sampled in its bounding box is inside it (generalised winding number > 0.5 "
                              "nowhere: an open sheet or surface?); give a closed or nearly closed mesh")
    base.metadata.update(inside_test="winding", repairs=repairs, defects=defects)
    return base


_SAMPLES = 48  # points along the longest side when looking for an inside of an unclosed mesh


def _drop_fins(mesh: trimesh.Trimesh) -> int:
    """Drop faces that hang off a non-manifold edge by an open edge (in place); returns how many."""
    inverse = mesh.edges_unique_inverse
    counts = np.bincount(inverse)[inverse].reshape(-1, 3)  # faces sharing each edge of each face
    fins = (counts > 2).any(axis=1) & (counts == 1).any(axis=1)
    if fins.any():
        mesh.update_faces(~fins)
        mesh.remove_unreferenced_vertices()
    return int(fins.sum())


def _close(mesh: trimesh.Trimesh) -> tuple[trimesh.Trimesh, list[str]]:
    """Try to make ``mesh`` a closed volume (in place): fill holes of 3 or 4 edges, orient outwards."""
    done = []
    if not mesh.is_watertight:
        face_count = len(mesh.faces)
        trimesh.repair.fill_holes(mesh)
        if len(mesh.faces) > face_count:
            done.append(f"filled holes with {len(mesh.faces) - face_count} faces")
    trimesh.repair.fix_normals(mesh)
    return mesh, done


def _defects(mesh: trimesh.Trimesh) -> str:
    """What keeps ``mesh`` from being a closed volume, in words (never empty)."""
    counts = np.bincount(mesh.edges_unique_inverse)
    open_edges, non_manifold = int(np.sum(counts == 1)), int(np.sum(counts > 2))
    found = []
    if open_edges:
        boundary = mesh.edges_unique[counts == 1]
        holes = _component_count(boundary)
        found.append(f"{open_edges} open edges in {holes} boundary loop{'s' if holes != 1 else ''}")
    if non_manifold:
        found.append(f"{non_manifold} non-manifold edges shared by more than two faces")
    if not found and not mesh.is_winding_consistent:
        found.append("faces whose orientation cannot be made consistent")
    if not found:
        found.append("closed but enclosing no positive volume")
    return ", ".join(found)


def _component_count(edges: np.ndarray) -> int:
    """Connected components of the graph with these edges [E, 2] (union-find; E is small: a mesh's boundary)."""
    parent: dict[int, int] = {}

    def root(v: int) -> int:
        parent.setdefault(v, v)
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for a, b in edges.tolist():
        parent[root(a)] = root(b)
    return len({root(v) for v in parent})
