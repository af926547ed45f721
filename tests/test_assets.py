"""Assets: meshes, lattice particles, grid mass (Warp kernel vs float64 twin), surface samples."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from conftest import BASE_SCENE

from diffmpm_cli.assets import build_assets, build_mesh
from diffmpm_cli.assets.lattice import inside_lattice, inside_lattice_winding, lattice_axis, lattice_particles
from diffmpm_cli.config import scene_from_dict
from diffmpm_cli.config.schema import Scene
from diffmpm_cli.errors import AssetError
from diffmpm_cli.reference.mpm import grid_mass_ref
from diffmpm_cli.sim.grid import GridSpec
from diffmpm_cli.sim.op import grid_mass

SHAPES = {
    "sphere": {"shape": "sphere", "radius": 0.2},
    "box": {"shape": "box", "size": [0.3, 0.2, 0.25], "rotation": [10, 20, 30]},
    "torus": {"shape": "torus", "major_radius": 0.2, "minor_radius": 0.08, "rotation": [30, 0, 0]},
    "capsule": {"shape": "capsule", "radius": 0.1, "height": 0.25, "axis": "x"},
    # a flat face parallel to the lattice rounds to whole particle layers: tilt it so the test measures volume
    "cylinder": {"shape": "cylinder", "radius": 0.12, "height": 0.3, "axis": "z", "rotation": [17, 11, 0]},
}


def scene_with(source: dict, tmp_path, **sim) -> Scene:
    data = {
        **BASE_SCENE,
        "source": {**source, "center": [0.5, 0.5, 0.5]},
        "target": {"truth": {"E": 1e4}},
        "sim": {**BASE_SCENE["sim"], "grid_resolution": 32, **sim},
        "loss": {"grid_mass": 0.0, "silhouette": 1.0},
    }
    return scene_from_dict(data, base_dir=tmp_path)


@pytest.mark.parametrize("name", list(SHAPES))
def test_particle_count_matches_mesh_volume(name, tmp_path):
    scene = scene_with(SHAPES[name], tmp_path)
    assets = build_assets(scene)
    expected = assets.source.mesh.volume / assets.spacing**3
    assert assets.source.particle_count == pytest.approx(expected, rel=0.05)
    # mass and rest volume per particle
    assert torch.allclose(assets.source.volumes, torch.tensor(assets.spacing**3))
    assert float(assets.source.masses.sum()) == pytest.approx(scene.material.density * assets.source.particle_count
                                                              * assets.spacing**3, rel=1e-5)


def test_containment_matches_an_analytic_sphere():
    radius, center = 0.3, np.array([0.01, -0.02, 0.015])
    mesh = trimesh.creation.icosphere(subdivisions=5, radius=radius)
    mesh.apply_translation(center)
    axes = [lattice_axis(-0.35, 0.35, 0.0, 0.02) for _ in range(3)]
    inside = inside_lattice(mesh, *axes)
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    distance = np.linalg.norm(grid - center, axis=-1)
    # icosphere vertices lie on the sphere, faces dip inside by at most r (1 - cos(edge angle / 2)) ~ 0.001
    clear = np.abs(distance - radius) > 2e-3
    assert np.array_equal(inside[clear], (distance < radius)[clear])


def test_containment_of_a_lattice_aligned_box_is_exact():
    """Box faces on lattice planes and columns through its edges: no double-counted crossings."""
    mesh = trimesh.creation.box(extents=[0.4, 0.4, 0.4])
    axes = [lattice_axis(-0.3, 0.3, -0.2, 0.05) - 0.025 for _ in range(3)]  # points at -0.2, -0.15, ...
    inside = inside_lattice(mesh, *axes)
    # strictly inside points must be in; points exactly on faces may go either way but consistently per column
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    strictly = np.all(np.abs(grid) < 0.2 - 1e-9, axis=-1)
    outside = np.any(np.abs(grid) > 0.2 + 1e-9, axis=-1)
    assert inside[strictly].all() and not inside[outside].any()


@pytest.mark.parametrize("order", ["quadratic", "cubic"])
def test_grid_mass_conserves_total_mass(order, tmp_path):
    scene = scene_with(SHAPES["torus"], tmp_path, bspline=order, boundary_cells=3)
    assets = build_assets(scene)
    mass = grid_mass(assets.source.positions, assets.source.masses, grid=assets.grid, bspline=order)
    total = float(assets.source.masses.double().sum())
    assert float(mass.double().sum()) == pytest.approx(total, rel=1e-5)
    assert float(mass.min()) >= 0.0


@pytest.mark.parametrize("order", ["quadratic", "cubic"])
def test_grid_mass_matches_the_float64_twin(order):
    grid = GridSpec(lower=(-0.1, 0.2, 0.0), dx=0.05, shape=(12, 10, 14), boundary_cells=3)
    generator = torch.Generator().manual_seed(3)
    lo = torch.tensor(grid.interior_lower)
    hi = torch.tensor(grid.interior_upper)
    positions = lo + (hi - lo) * torch.rand(300, 3, generator=generator, dtype=torch.float64)
    masses = 0.5 + torch.rand(300, generator=generator, dtype=torch.float64)
    warp_mass = grid_mass(positions.float(), masses.float(), grid=grid, bspline=order)
    ref = grid_mass_ref(positions, masses, lower=grid.lower, dx=grid.dx, shape=grid.shape, order=order)
    assert warp_mass.shape == ref.shape
    assert torch.allclose(warp_mass.double(), ref, atol=1e-5 * float(ref.max()), rtol=0)
    assert float(ref.sum()) == pytest.approx(float(masses.sum()), rel=1e-12)  # the twin is exact too


def test_target_grid_mass_and_surface_samples(tmp_path):
    scene = scene_from_dict(BASE_SCENE, base_dir=tmp_path)
    assets = build_assets(scene)
    target = assets.target
    assert assets.target_grid_mass.shape == assets.grid.shape
    assert float(assets.target_grid_mass.sum()) == pytest.approx(float(target.masses.sum()), rel=1e-5)
    # the target is rendered once, by 4x the source's Gaussians unless target.surface_samples says otherwise
    m = 4 * scene.appearance.surface_samples
    assert target.surface_points.shape == (m, 3) and target.surface_normals.shape == (m, 3)
    assert assets.source.surface_points.shape == (scene.appearance.surface_samples, 3)
    own = build_assets(scene_from_dict({**BASE_SCENE, "target": {**BASE_SCENE["target"], "surface_samples": 700}},
                                       base_dir=tmp_path))
    assert own.target.surface_points.shape == (700, 3)
    assert torch.allclose(target.surface_normals.norm(dim=1), torch.ones(m), atol=1e-5)
    # samples lie on the mesh surface and normals point outwards
    closest, distance, _ = trimesh.proximity.closest_point(target.mesh, target.surface_points.numpy())
    assert distance.max() < 1e-6
    outward = target.surface_points.numpy() + 1e-3 * target.surface_normals.numpy()
    assert not target.mesh.contains(outward[:200]).any()


def test_composition_union_and_difference(tmp_path):
    a = {"shape": "sphere", "radius": 0.15, "center": [0.0, -0.1, 0.0]}
    b = {"shape": "sphere", "radius": 0.15, "center": [0.0, 0.1, 0.0]}
    union = build_mesh(Scene.model_validate({"source": {"shape": "union", "parts": [a, b]}, "target": {"truth": {}}}
                                            ).source, key="source", default_center=(0.5, 0.5, 0.5))
    cap = math.pi * (0.15 - 0.1) ** 2 * (3 * 0.15 - (0.15 - 0.1)) / 3  # one spherical cap of the lens
    sphere = 4 / 3 * math.pi * 0.15**3
    assert union.is_watertight
    assert union.volume == pytest.approx(2 * sphere - 2 * cap, rel=0.01)
    assert np.allclose(union.bounds.mean(axis=0), [0.5, 0.5, 0.5], atol=1e-6)
    diff = build_mesh(Scene.model_validate({"source": {"shape": "difference", "parts": [a, b]}, "target": {"truth": {}}}
                                           ).source, key="source", default_center=(0.0, 0.0, 0.0))
    assert diff.volume == pytest.approx(sphere - 2 * cap, rel=0.01)


@pytest.mark.parametrize("suffix", [".obj", ".ply", ".stl", ".off", ".glb"])
def test_mesh_file_formats_load_recentred_and_sized(suffix, tmp_path):
    mesh = trimesh.creation.capsule(height=2.0, radius=1.0)  # 2 x 2 x 4 units, off-centre
    mesh.apply_translation([5.0, -3.0, 1.0])
    mesh.export(tmp_path / f"capsule{suffix}")
    scene = scene_with({"shape": "mesh", "path": f"capsule{suffix}", "size": 0.4}, tmp_path)
    assets = build_assets(scene)
    extents = assets.source.mesh.extents
    assert max(extents) == pytest.approx(0.4, rel=1e-4)
    assert np.allclose(assets.source.mesh.bounds.mean(axis=0), [0.5, 0.5, 0.5], atol=1e-6)
    assert assets.source.particle_count == pytest.approx(assets.source.mesh.volume / assets.spacing**3, rel=0.05)


def test_small_hole_is_repaired(tmp_path):
    box = trimesh.creation.box(extents=[0.3, 0.3, 0.3])
    box.update_faces(np.arange(len(box.faces)) != 0)  # drop one triangle
    assert not box.is_watertight
    box.export(tmp_path / "holed.stl")
    assets = build_assets(scene_with({"shape": "mesh", "path": "holed.stl"}, tmp_path))
    assert assets.source.mesh.is_watertight
    assert assets.source.mesh.volume == pytest.approx(0.027, rel=1e-6)


def test_jitter_is_seeded_and_bounded(tmp_path):
    plain = build_assets(scene_with(SHAPES["sphere"], tmp_path)).source.positions
    a = build_assets(scene_with(SHAPES["sphere"], tmp_path, jitter=0.5)).source.positions
    b = build_assets(scene_with(SHAPES["sphere"], tmp_path, jitter=0.5)).source.positions
    assert torch.equal(a, b)
    spacing = 1 / 32 / 2
    offsets = (a - plain).abs()
    assert float(offsets.max()) <= 0.25 * spacing + 1e-6 and float(offsets.max()) > 0.2 * spacing


def test_a_shape_thinner_than_the_lattice_is_an_error(tmp_path):
    scene = scene_with({"shape": "box", "size": [0.3, 0.002, 0.3]}, tmp_path)
    with pytest.raises(AssetError, match=r"^source: the shape holds no particle"):
        build_assets(scene)


# --- meshes that are not clean closed volumes (issue #11, item 5) ------------------------------------------------

MESHES = Path(__file__).resolve().parents[1] / "scenes" / "meshes"


def write_obj(path, vertices, faces, uvs=None) -> None:
    """A hand-written OBJ (with one `vt` per vertex when ``uvs`` is given) so the file says exactly what we mean."""
    lines = [f"v {x:.9g} {y:.9g} {z:.9g}" for x, y, z in vertices]
    if uvs is None:
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    else:
        lines += [f"vt {u:.9g} {v:.9g}" for u, v in uvs]
        lines += [f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {c + 1}/{c + 1}" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")


def icosphere(radius=0.2) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=4, radius=radius)


def expected_count(volume: float, assets) -> float:
    """Particles a volume [m^3] holds, for a shape scaled by nothing (no `size`): volume / spacing^3."""
    return volume / assets.spacing**3


def test_mesh_with_an_open_hole_loads_through_the_winding_number(tmp_path):
    sphere = icosphere()
    cap = sphere.triangles_center[:, 2] > 0.17  # a polar cap of ~40 faces: a hole far beyond fill_holes' quads
    holed = trimesh.Trimesh(sphere.vertices, sphere.faces[~cap], process=False)
    holed.remove_unreferenced_vertices()
    assert not holed.is_watertight and cap.sum() > 20
    write_obj(tmp_path / "holed.obj", holed.vertices, holed.faces)
    assets = build_assets(scene_with({"shape": "mesh", "path": "holed.obj"}, tmp_path))
    mesh = assets.source.mesh
    assert not mesh.is_watertight and mesh.metadata["inside_test"] == "winding"
    assert "open edges in 1 boundary loop" in mesh.metadata["defects"]
    # the missing cap holds 1.6 % of the sphere; w > 1/2 keeps about half of it
    assert assets.source.particle_count == pytest.approx(expected_count(sphere.volume, assets), rel=0.03)
    # downstream needs of an open mesh: surface samples on it, normals outwards
    center = mesh.bounds.mean(axis=0)
    outward = np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center - center)
    assert (outward > 0).all() and mesh.area > 0
    points, normals = assets.source.surface_points.numpy(), assets.source.surface_normals.numpy()
    assert np.einsum("ij,ij->i", normals, points - center).min() > 0


def test_an_inward_facing_open_mesh_is_turned_outwards(tmp_path):
    sphere = icosphere()
    keep = sphere.triangles_center[:, 2] < 0.17
    write_obj(tmp_path / "inverted.obj", sphere.vertices, np.fliplr(sphere.faces[keep]))
    assets = build_assets(scene_with({"shape": "mesh", "path": "inverted.obj"}, tmp_path))
    assert "faces turned outwards" in assets.source.mesh.metadata["repairs"]
    assert assets.source.particle_count == pytest.approx(expected_count(sphere.volume, assets), rel=0.03)


def test_uv_seams_are_merged_into_a_closed_mesh(tmp_path):
    """Each half of a sphere has its own copies of the equator's vertices, with different UVs (a texture seam)."""
    sphere = icosphere()
    upper = sphere.triangles_center[:, 2] > 0.0
    vertices, faces, uvs = [], [], []
    for half, shift in ((upper, 0.0), (~upper, 0.5)):
        used = np.unique(sphere.faces[half])
        remap = np.full(len(sphere.vertices), -1)
        remap[used] = np.arange(len(used)) + sum(len(v) for v in vertices)
        vertices.append(sphere.vertices[used])
        faces.append(remap[sphere.faces[half]])
        uvs.append(0.5 * (sphere.vertices[used, :2] / 0.2 + 1.0) * [0.5, 1.0] + [shift, 0.0])
    write_obj(tmp_path / "seams.obj", np.concatenate(vertices), np.concatenate(faces), np.concatenate(uvs))
    as_loaded = trimesh.load(tmp_path / "seams.obj", force="mesh", process=True)
    assert not as_loaded.is_watertight  # trimesh keeps the seam's copies apart: they differ in UV
    assets = build_assets(scene_with({"shape": "mesh", "path": "seams.obj"}, tmp_path))
    mesh = assets.source.mesh
    assert mesh.is_watertight and mesh.metadata["inside_test"] == "parity"
    assert mesh.volume == pytest.approx(sphere.volume, rel=1e-9)
    assert assets.source.particle_count == pytest.approx(expected_count(sphere.volume, assets), rel=0.03)


def test_a_fin_on_a_non_manifold_edge_is_dropped(tmp_path):
    sphere = icosphere()
    a, b = sphere.edges_unique[0]
    tip = 1.5 * (sphere.vertices[a] + sphere.vertices[b]) / 2  # a triangle sticking out of the surface
    vertices = np.vstack([sphere.vertices, tip])
    faces = np.vstack([sphere.faces, [[a, b, len(sphere.vertices)]]])
    write_obj(tmp_path / "fin.obj", vertices, faces)
    assets = build_assets(scene_with({"shape": "mesh", "path": "fin.obj"}, tmp_path))
    mesh = assets.source.mesh
    assert mesh.is_watertight and mesh.metadata["inside_test"] == "parity"
    assert "dropped 1 faces dangling from non-manifold edges" in mesh.metadata["repairs"]
    assert mesh.volume == pytest.approx(sphere.volume, rel=1e-9)
    assert assets.source.particle_count == pytest.approx(expected_count(sphere.volume, assets), rel=0.03)


def test_parts_touching_along_an_edge_load_through_the_winding_number(tmp_path):
    """Two boxes sharing one edge: four faces on it, no open edge (was 'not watertight (0 open edges)')."""
    first = trimesh.creation.box(extents=[0.16, 0.16, 0.16])
    second = first.copy()
    second.apply_translation([0.16, 0.16, 0.0])
    pair = trimesh.util.concatenate([first, second])
    pair.apply_transform(trimesh.transformations.euler_matrix(0.3, 0.2, 0.1))  # faces off the lattice planes
    write_obj(tmp_path / "pinched.obj", pair.vertices, pair.faces)
    assets = build_assets(scene_with({"shape": "mesh", "path": "pinched.obj"}, tmp_path))
    mesh = assets.source.mesh
    assert mesh.metadata["inside_test"] == "winding"
    assert mesh.metadata["defects"] == "1 non-manifold edges shared by more than two faces"
    assert assets.source.particle_count == pytest.approx(expected_count(2 * 0.16**3, assets), rel=0.05)


def test_winding_number_agrees_with_parity_on_a_closed_mesh():
    major, minor = 0.2, 0.08
    mesh = trimesh.creation.torus(major, minor, major_sections=64, minor_sections=32)
    mesh.apply_transform(trimesh.transformations.euler_matrix(0.5, 0.2, 0.0))
    axes = [lattice_axis(-0.3, 0.3, 0.0, 0.01) for _ in range(3)]
    parity = inside_lattice(mesh, *axes)
    winding = inside_lattice_winding(mesh, *axes)
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    local = trimesh.transform_points(grid, np.linalg.inv(trimesh.transformations.euler_matrix(0.5, 0.2, 0.0)))
    tube = np.hypot(np.hypot(local[:, 0], local[:, 1]) - major, local[:, 2])
    clear = (np.abs(tube - minor) > 2e-3).reshape(parity.shape)  # faces dip inside the analytic tube by < 4e-4
    assert parity.sum() > 1000
    assert np.array_equal(parity[clear], winding[clear])
    assert np.array_equal(parity[clear], (tube < minor).reshape(parity.shape)[clear])


@pytest.mark.parametrize("method", ["parity", "winding"])
def test_lattice_particles_method_is_chosen_by_the_caller(method):
    mesh = icosphere(0.2)
    points = lattice_particles(mesh, origin=(0.0, 0.0, 0.0), spacing=0.02, jitter=0.0, rng=np.random.default_rng(0),
                               method=method)
    auto = lattice_particles(mesh, origin=(0.0, 0.0, 0.0), spacing=0.02, jitter=0.0, rng=np.random.default_rng(0))
    assert len(points) == pytest.approx(mesh.volume / 0.02**3, rel=0.03)
    assert np.array_equal(points, auto)  # on this sphere no lattice point is near enough the surface to differ


def test_a_flat_open_sheet_is_one_clear_error(tmp_path):
    plane = trimesh.creation.box(extents=[0.3, 0.3, 0.3])
    top = plane.triangles_center[:, 2] > 0.1  # the two triangles of one face: a square sheet
    sheet = trimesh.Trimesh(plane.vertices, plane.faces[top], process=False)
    sheet = sheet.subdivide().subdivide()
    sheet.apply_transform(trimesh.transformations.euler_matrix(0.3, 0.4, 0.0))
    write_obj(tmp_path / "sheet.obj", sheet.vertices, sheet.faces)
    with pytest.raises(AssetError) as info:  # raised where the shape is built
        build_assets(scene_with({"shape": "mesh", "path": "sheet.obj"}, tmp_path))
    message = str(info.value)
    assert re.match(r"^source\.path: '.*sheet\.obj' encloses no volume: it is not closed \(16 open edges in 1 boundary "
                    r"loop\) and none of \d+ points sampled in its bounding box is inside it", message), message
    assert "0 open edges" not in message and "\n" not in message


def test_an_open_mesh_file_in_a_boolean_is_refused(tmp_path):
    sphere = icosphere(0.15)
    keep = sphere.triangles_center[:, 2] < 0.12
    write_obj(tmp_path / "bowl.obj", sphere.vertices, sphere.faces[keep])
    parts = [{"shape": "mesh", "path": "bowl.obj"}, {"shape": "sphere", "radius": 0.1, "center": [0.1, 0, 0]}]
    with pytest.raises(AssetError, match=r"^source\.parts\[0\]: is a mesh that is not closed \(\d+ open edges "
                                         r"in 1 boundary loop\); a union needs closed volumes"):
        build_assets(scene_with({"shape": "union", "parts": parts}, tmp_path))


REAL_MESHES = {  # file in scenes/meshes: (inside test after repair, what is wrong with it as published)
    "bunny_scan.obj": ("winding", "open edges in 4 boundary loops"),
    "spot.obj": ("parity", "merged 295 vertices sharing a position (seams)"),
    "cat.obj": ("parity", ""),
}


@pytest.mark.parametrize("name", list(REAL_MESHES))
def test_shipped_real_meshes_give_particles(name, tmp_path):
    inside_test, defect = REAL_MESHES[name]
    scene = scene_with({"shape": "mesh", "path": str(MESHES / name), "size": 0.35}, tmp_path, grid_resolution=48)
    assets = build_assets(scene)
    mesh = assets.source.mesh
    assert mesh.metadata["inside_test"] == inside_test
    assert defect in mesh.metadata["defects"] + "; ".join(mesh.metadata["repairs"])
    assert max(mesh.extents) == pytest.approx(0.35, rel=1e-6)
    if mesh.is_watertight:
        volume = mesh.volume
    else:  # an independent estimate: the holes capped by fans
        capped = mesh.copy()
        trimesh.repair.fill_holes(capped, use_fan=True)
        assert capped.is_watertight
        volume = capped.volume
    assert assets.source.particle_count == pytest.approx(volume / assets.spacing**3, rel=0.04)
    assert len(assets.source.surface_points) == scene.appearance.surface_samples
