"""Assets: meshes, lattice particles, grid mass (Warp kernel vs float64 twin), surface samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from conftest import BASE_SCENE

from diffmpm_cli.assets import build_assets, build_mesh
from diffmpm_cli.assets.lattice import inside_lattice, lattice_axis
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
    m = scene.appearance.surface_samples
    assert target.surface_points.shape == (m, 3) and target.surface_normals.shape == (m, 3)
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
